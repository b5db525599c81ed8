"""Session functions the tests run: ones that succeed, fail, prune, hang or misbehave."""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

from hpo_framework import report


def quadratic(cfg: dict[str, Any]) -> float:
    time.sleep(cfg.get("sleep_s", 0))
    return float((cfg["x"] - 2) ** 2)


def echo_cfg(cfg: dict[str, Any]) -> float:
    """Records the cfg it got in a file named by cfg["out"], for tests that inspect cfg."""
    import json

    with open(cfg["out"], "a") as f:
        f.write(json.dumps(cfg, sort_keys=True) + "\n")
    return float(cfg.get("x", 0.0))


def raises(cfg: dict[str, Any]) -> float:
    raise RuntimeError("boom: the model diverged")


def returns_nan(cfg: dict[str, Any]) -> float:
    return math.nan


def returns_inf(cfg: dict[str, Any]) -> float:
    return math.inf


def returns_none(cfg: dict[str, Any]) -> Any:
    return None


def returns_str(cfg: dict[str, Any]) -> Any:
    return "0.5"


def returns_pair(cfg: dict[str, Any]) -> Any:
    return (cfg["x"], -cfg["x"])


def calls_exit(cfg: dict[str, Any]) -> float:
    sys.exit(3)


def fails_when_x_small(cfg: dict[str, Any]) -> float:
    if cfg["x"] < 0:
        raise ValueError(f"x={cfg['x']} is negative")
    return float(cfg["x"])


def fail_first_attempt(cfg: dict[str, Any]) -> float:
    """Fails the first time a given x is seen (marker files in cfg["dir"]), succeeds after."""
    marker = os.path.join(cfg["dir"], f"seen-{cfg['x']!r}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("transient failure")
    return float(cfg["x"])


def two_objectives(cfg: dict[str, Any]) -> tuple[float, float]:
    x = cfg["x"]
    return float(x**2), float((x - 2) ** 2)


def reports_steps(cfg: dict[str, Any]) -> float:
    """A curve that is flat at x: the median pruner stops the worse half after warm-up."""
    for step in range(10):
        report(cfg["x"] + 1.0 / (step + 1), step)
    return float(cfg["x"])


def sleepy(cfg: dict[str, Any]) -> float:
    """Sleeps cfg["sleep_s"]; leaves a file when it starts so tests know a trial is running."""
    if "dir" in cfg:
        open(os.path.join(cfg["dir"], f"started-{os.getpid()}-{time.time()}"), "w").close()
    time.sleep(cfg["sleep_s"])
    return float(cfg["x"])


def jitter(cfg: dict[str, Any]) -> float:
    """Sleeps 0.1-0.5 s (a function of x, so a retried point sleeps as long): the soak's load."""
    time.sleep(0.1 + 0.4 * ((cfg["x"] * 1000) % 1.0))
    return float((cfg["x"] - 2) ** 2)


NOT_CALLABLE = 42


def prints_megabytes(cfg: dict[str, Any]) -> float:
    for _ in range(50):
        print("x" * 100_000)
    return float(cfg["x"])


def hangs_first_time_ignoring_signals(cfg: dict[str, Any]) -> float:
    """Like a C call stuck with signals blocked: only the trial_timeout watchdog ends it."""
    import signal

    marker = os.path.join(cfg["dir"], "hung-once")
    if not os.path.exists(marker):
        open(marker, "w").close()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGTERM})
        time.sleep(3600)
    return float(cfg["x"])


# --- sessions that misbehave when x < 0 (the executor must contain them) ---------------------


def _misbehave_if_negative(cfg: dict[str, Any], act: Any) -> float:
    if cfg["x"] < 0:
        act()
    return float(cfg["x"])


def raises_cancelled(cfg: dict[str, Any]) -> float:
    import asyncio

    def act() -> None:
        raise asyncio.CancelledError("cancelled by the session")

    return _misbehave_if_negative(cfg, act)


def raises_keyboard_interrupt(cfg: dict[str, Any]) -> float:
    def act() -> None:
        raise KeyboardInterrupt

    return _misbehave_if_negative(cfg, act)


def segfaults(cfg: dict[str, Any]) -> float:
    import ctypes

    return _misbehave_if_negative(cfg, lambda: ctypes.string_at(0))


def exits_hard(cfg: dict[str, Any]) -> float:
    return _misbehave_if_negative(cfg, lambda: os._exit(3))


def holds_the_gil(cfg: dict[str, Any]) -> float:
    """One C call of cfg["hold_s"] seconds that never releases the GIL (PyDLL keeps it)."""
    import ctypes

    ctypes.PyDLL(None).sleep(int(cfg["hold_s"]))
    return float(cfg["x"])


def forks_and_hangs(cfg: dict[str, Any]) -> float:
    """Leaves a child process behind (its pid in cfg["dir"]) and hangs with SIGTERM blocked."""
    import signal
    import subprocess

    def act() -> None:
        child = subprocess.Popen(["sleep", "3600"])
        with open(os.path.join(cfg["dir"], "child.pid"), "w") as f:
            f.write(str(child.pid))
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        time.sleep(3600)

    return _misbehave_if_negative(cfg, act)


def halves_a_nested_static(cfg: dict[str, Any]) -> float:
    """Edits the cfg it got in place; no later trial may see the edit."""
    cfg["model"]["width"] //= 2
    return float(cfg["model"]["width"])


def returns_numpy(cfg: dict[str, Any]) -> Any:
    """numpy results by cfg["kind"]: a scalar, an array of two, or a numpy bool."""
    import numpy as np

    kind = cfg["kind"]
    if kind == "scalar":
        return np.float32(cfg["x"])
    if kind == "pair":
        return np.array([cfg["x"], -cfg["x"]])
    return np.bool_(True)


def raises_markup(cfg: dict[str, Any]) -> float:
    raise FileNotFoundError("no such file [/data/train] [bold]")


def killed_like_oom(cfg: dict[str, Any]) -> float:
    """What the kernel's OOM killer does to a session: SIGKILL, no say in it."""
    import signal

    return _misbehave_if_negative(cfg, lambda: os.kill(os.getpid(), signal.SIGKILL))


def uses_the_trial_context(cfg: dict[str, Any]) -> float:
    """Records a metric and what it knows of its trial; returns the trial's number."""
    from hpo_framework import trial

    t = trial()
    t.log(accuracy=0.75)
    t.set_attr("seen", {"study": t.study, "attempt": t.attempt, "worker": t.worker})
    return float(t.number if t.number is not None else -1)


def sets_a_reserved_attr(cfg: dict[str, Any]) -> float:
    from hpo_framework import trial

    trial().set_attr("worker", "me")
    return 0.0


def checkpointed(cfg: dict[str, Any]) -> float:
    """20 epochs, saving its state after each and carrying on from a checkpoint when there is
    one; leaves a file ``epoch-<attempt>-<epoch>`` per epoch it runs in cfg["dir"], and
    ``saved-<attempt>-<epoch>`` once that epoch's save has returned. With
    ``as_file``, the state goes through a JSON file (checkpoint.save_file / load_file); with
    ``fail_at``, the first attempt fails after saving that epoch."""
    import json
    import math

    from hpo_framework import checkpoint, trial

    if cfg.get("chdir"):
        os.chdir(cfg["chdir"])  # as Hydra does: checkpoints must not follow
    if cfg.get("as_file"):
        local = os.path.join(cfg["dir"], f"state-{trial().number}.json")
        state = None
        if checkpoint.load_file(local):
            with open(local) as f:
                state = json.load(f)
    else:
        state = checkpoint.load()
    state = state or {"epoch": 0, "total": 0.0}
    attempt = trial().attempt
    for epoch in range(state["epoch"], 20):
        state["total"] += math.sin(cfg["x"] * (epoch + 1))
        open(os.path.join(cfg["dir"], f"epoch-{attempt}-{epoch}"), "w").close()
        state["epoch"] = epoch + 1
        if cfg.get("as_file"):
            with open(local, "w") as f:
                json.dump(state, f)
            checkpoint.save_file(local)
        else:
            checkpoint.save(state)
        open(os.path.join(cfg["dir"], f"saved-{attempt}-{epoch}"), "w").close()  # save returned
        if attempt == 0 and epoch == cfg.get("fail_at"):
            raise RuntimeError(f"failed after epoch {epoch}")
        time.sleep(cfg["epoch_s"])
    time.sleep(cfg.get("final_s", 0))
    return float(state["total"])


def layers_by_run(cfg: dict[str, Any]) -> float:
    """Optuna's classic loop: n_layers comes from search_space, each layer's units and the
    activation are asked for by the session itself (define-by-run)."""
    from hpo_framework import trial

    t = trial()
    units = [t.suggest_int(f"units_l{i}", 4, 64, log=True) for i in range(cfg["n_layers"])]
    act = t.suggest_categorical("act", ["relu", "tanh"])
    if cfg.get("fail_first") and t.attempt == 0:
        raise RuntimeError("the first attempt of every point fails")
    if cfg.get("ask_for") is not None:
        t.suggest_int(cfg["ask_for"], 1, 3)
    return float(sum(units)) / 100 + (0.5 if act == "tanh" else 0.0)


def constrained(cfg: dict[str, Any]) -> float:
    """(x - 2)^2 with the constraint x <= 1 (as x - 1 <= 0), given through trial()."""
    from hpo_framework import trial

    trial().set_constraint("x_at_most_1", cfg["x"] - 1.0)
    return float((cfg["x"] - 2) ** 2)


def example_interrupted(cfg: dict[str, Any]) -> float:
    """The example session, whose first attempt dies right after epoch ``cfg["stop_at"]``
    (its checkpoint saved): the retry must carry on from there."""
    from experiments import linear_regression
    from hpo_framework import trial

    if trial().attempt > 0:
        return linear_regression.single_session(cfg)
    reported = linear_regression.report

    def report(value: float, step: int) -> None:
        reported(value, step)
        if step == cfg["stop_at"]:
            raise RuntimeError(f"interrupted after epoch {step}")

    linear_regression.report = report  # type: ignore[assignment]
    try:
        return linear_regression.single_session(cfg)
    finally:
        linear_regression.report = reported


def logs_history(cfg: dict[str, Any]) -> float:
    """Logs a loss per epoch (a float) and the epoch (an int); returns the last loss."""
    from hpo_framework import trial

    loss = 0.0
    for epoch in range(cfg.get("epochs", 4)):
        loss = cfg["x"] ** 2 / (epoch + 1)
        trial().log(step=epoch, loss=loss, epoch=epoch)
    trial().log(note_free=1.5)  # no step
    return loss


def reports_then_waits(cfg: dict[str, Any]) -> float:
    """Reports steps 0..2, leaves ``reported-*`` in cfg["dir"], then waits for ``go``."""
    from hpo_framework import report

    for step in range(3):
        report(10.0 - step, step)
    open(os.path.join(cfg["dir"], f"reported-{os.getpid()}"), "w").close()
    while not os.path.exists(os.path.join(cfg["dir"], "go")):
        time.sleep(0.05)
    return float(cfg["x"])


def records_its_process(cfg: dict[str, Any]) -> float:
    """Writes what the executor it runs in got (pid, parent, CUDA_VISIBLE_DEVICES, working
    directory, a draw from NumPy's global generator and torch's where it is loaded) to a file in
    cfg["dir"]."""
    import json

    import numpy

    seen = {
        "pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0),
        "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "cwd": os.getcwd(),
        "numpy": float(numpy.random.rand()),
    }  # fmt: skip
    if "torch" in sys.modules:  # preloaded
        seen["torch"] = float(sys.modules["torch"].rand(1))
    time.sleep(cfg.get("sleep_s", 0))
    with open(os.path.join(cfg["dir"], f"process-{os.getpid()}-{time.time()}.json"), "w") as f:
        json.dump(seen, f)
    return float(cfg["x"])
