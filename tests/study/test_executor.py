"""The worker runtime: sessions run in an executor process, so whatever a session does fails
at most its own trial; the supervisor keeps beating and serves the next trial. Real worker
processes, real signals, real crashes."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpo_framework.exceptions import SessionError
from hpo_framework.runtime.executor import ObjectiveCountError, check_result
from tests.conftest import BIN, ROOT, cli_env, make_config, run_cli, start_worker, write_config
from tests.pool_helpers import counts, create, trials, wait_until


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; killed (with their process groups) even when it fails."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


MISBEHAVIOURS = [
    ("raises_cancelled", "CancelledError: cancelled by the session"),
    ("raises_keyboard_interrupt", "KeyboardInterrupt"),
    ("segfaults", "session process killed by SIGSEGV"),
    ("exits_hard", "session process exited with status 3"),
    ("killed_like_oom", "session process killed by SIGKILL (out of memory?)"),
]


@pytest.mark.parametrize(("session", "error"), MISBEHAVIOURS)
def test_a_misbehaving_session_fails_only_its_trial(
    session: str, error: str, sqlite_url: str, tmp_path: Path,
    procs: list[subprocess.Popen[str]],
) -> None:  # fmt: skip
    name = create(
        tmp_path, sqlite_url, session=f"tests.sessions:{session}",
        study_={"n_trials": 2, "max_retries": 0, "max_failed_trials": 20},
        enqueue=[{"x": -1.0}, {"x": 1.0}],
    )  # fmt: skip
    worker = start_worker("--idle-exit", "2", url=sqlite_url, log=tmp_path / "w.log")
    procs.append(worker)
    assert worker.wait(timeout=120) == 0, (tmp_path / "w.log").read_text()[-3000:]
    result = trials(sqlite_url, name)
    first = result[0]
    assert first.state.name == "FAIL" and first.params == {"x": -1.0}
    assert first.user_attrs["error"] == error
    assert result[1].state.name == "COMPLETE" and result[1].params == {"x": 1.0}
    assert counts(sqlite_url, name)["COMPLETE"] == 2
    # one worker served every trial, so the crash did not take its process down
    assert len({t.user_attrs["worker"] for t in result}) == 1


def test_a_session_holding_the_gil_past_the_grace_period_keeps_its_result(
    pg_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """An 8 s C call that never releases the GIL, with heartbeats every 1 s and a 4 s grace:
    the heartbeat lives in the supervisor, so the trial is not judged lost."""
    name = create(
        tmp_path, pg_url, session="tests.sessions:holds_the_gil", static={"hold_s": 8},
        study_={"n_trials": 1, "heartbeat_interval": 1, "grace_period": 4},
    )  # fmt: skip
    holder = start_worker("--idle-exit", "2", url=pg_url)
    sweeper = start_worker("--idle-exit", "12", url=pg_url)  # sweeps while it waits
    procs += [holder, sweeper]
    assert holder.wait(timeout=120) == 0 and sweeper.wait(timeout=120) == 0
    result = trials(pg_url, name)
    assert [(t.state.name, t.user_attrs.get("error")) for t in result] == [("COMPLETE", None)]


def test_trial_timeout_kills_a_deaf_session_and_its_children_not_the_worker(
    sqlite_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    name = create(
        tmp_path, sqlite_url, session="tests.sessions:forks_and_hangs",
        static={"dir": str(tmp_path)}, enqueue=[{"x": -1.0}, {"x": 1.0}],
        study_={"n_trials": 2, "trial_timeout": 1, "max_retries": 0, "max_failed_trials": 20},
    )  # fmt: skip
    worker = start_worker("--idle-exit", "2", url=sqlite_url, log=tmp_path / "w.log")
    procs.append(worker)
    assert worker.wait(timeout=120) == 0, (tmp_path / "w.log").read_text()[-3000:]
    result = trials(sqlite_url, name)
    assert [t.state.name for t in result[:2]] == ["FAIL", "COMPLETE"]
    assert result[0].user_attrs["error"] == "trial_timeout of 1s exceeded"
    child = int((tmp_path / "child.pid").read_text())
    with pytest.raises(ProcessLookupError):  # the session's child went with it
        os.kill(child, 0)


def test_a_session_editing_its_cfg_changes_no_other_trial(
    storage_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    name = create(
        tmp_path, storage_url, session="tests.sessions:halves_a_nested_static",
        static={"model": {"width": 1000}}, study_={"n_trials": 4},
    )  # fmt: skip
    worker = start_worker("--idle-exit", "2", url=storage_url)
    procs.append(worker)
    assert worker.wait(timeout=120) == 0
    assert [t.value for t in trials(storage_url, name)] == [500.0] * 4


def test_run_hpo_copies_cfg_deeply_for_an_in_process_session(tmp_path: Path) -> None:
    from hpo_framework import run_hpo

    seen: list[int] = []

    def session(cfg: dict[str, Any]) -> float:  # a closure: runs in this process
        cfg["model"]["width"] //= 2
        seen.append(cfg["model"]["width"])
        return float(cfg["x"])

    config = make_config(static={"model": {"width": 1000}}, study_={"n_trials": 3})
    path = write_config(tmp_path / "c.yaml", config)
    run_hpo(session, path, f"sqlite:///{tmp_path / 'db'}")
    assert seen == [500, 500, 500]


def test_one_ctrl_c_on_a_pool_is_one_warm_stop(
    pg_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """A terminal sends SIGINT to the whole foreground process group: the pool's children
    must count it once, finish their trials and exit 0."""
    name = create(
        tmp_path, pg_url, session="tests.sessions:sleepy",
        static={"sleep_s": 2, "dir": str(tmp_path)}, study_={"n_trials": 100},
    )  # fmt: skip
    with open(tmp_path / "pool.log", "w") as log:
        pool = subprocess.Popen(
            [str(BIN / "hpo-worker"), "--processes", "3"], cwd=ROOT, env=cli_env(pg_url),
            stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
    procs.append(pool)
    wait_until(
        "3 trials running",
        lambda: len(list(tmp_path.glob("started-*"))) >= 3,
        timeout=60,
    )
    os.killpg(pool.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    assert pool.wait(timeout=60) == 0, (tmp_path / "pool.log").read_text()[-3000:]
    c = counts(pg_url, name)
    assert c["FAIL"] == c["RUNNING"] == 0 and c["COMPLETE"] >= 3


def test_a_pool_child_killed_is_replaced(
    pg_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    name = create(
        tmp_path, pg_url, session="tests.sessions:sleepy",
        static={"sleep_s": 0.3}, study_={"n_trials": 30, "heartbeat_interval": 1,
                                          "grace_period": 3},
    )  # fmt: skip
    pool = start_worker("--processes", "2", "--idle-exit", "3", url=pg_url,
                        log=tmp_path / "pool.log")  # fmt: skip
    procs.append(pool)
    wait_until("trials", lambda: counts(pg_url, name)["COMPLETE"] >= 2, timeout=60)
    children = _children(pool.pid)
    assert len(children) == 2
    os.kill(children[0], signal.SIGKILL)
    wait_until(
        "a new child", lambda: len(set(_children(pool.pid)) - set(children)) == 1, timeout=60
    )
    assert pool.wait(timeout=180) == 0  # the replacement exits cleanly at the end
    c = counts(pg_url, name)
    assert c["COMPLETE"] == 30 and c["RUNNING"] == 0
    assert "died with status 137; restarting" in (tmp_path / "pool.log").read_text()


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "hpo-worker" in line]


@pytest.mark.parametrize(
    ("result", "n", "expected"),
    [(1, 1, [1.0]), ((1, 2.5), 2, [1.0, 2.5]), ([3], 1, [3.0])],
)
def test_check_result_accepts_numbers(result: Any, n: int, expected: list[float]) -> None:
    assert check_result(result, n) == expected


def test_check_result_numpy_and_torch_alike() -> None:
    import numpy as np  # installed with optuna
    import torch  # the examples extra, installed by `make`

    assert check_result(np.float32(0.5), 1) == [0.5]
    assert check_result(np.array([1.0, 2.0]), 2) == [1.0, 2.0]
    assert check_result(torch.tensor(0.25), 1) == [0.25]
    assert check_result(torch.tensor([1.0, 2.0]), 2) == [1.0, 2.0]
    for bad in (True, np.bool_(True), torch.tensor(True), np.array([True, False])):
        with pytest.raises(SessionError, match="not a number"):
            check_result(bad, 2 if getattr(bad, "ndim", 0) else 1)
    with pytest.raises(ObjectiveCountError):
        check_result(np.array([1.0, 2.0, 3.0]), 2)


def test_numpy_results_through_a_worker(
    sqlite_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    pair = create(
        tmp_path, sqlite_url, name="pair", session="tests.sessions:returns_numpy",
        static={"kind": "pair"}, study_={"n_trials": 2, "directions": ["minimize", "maximize"],
                                         "direction": None, "sampler": {"name": "random"}},
    )  # fmt: skip
    flag = create(
        tmp_path, sqlite_url, name="flag", session="tests.sessions:returns_numpy",
        static={"kind": "bool"}, study_={"n_trials": 1, "max_retries": 0,
                                         "max_failed_trials": 1},
    )  # fmt: skip
    worker = start_worker("--idle-exit", "2", url=sqlite_url)
    procs.append(worker)
    assert worker.wait(timeout=120) == 0
    assert counts(sqlite_url, pair) == {"COMPLETE": 2}
    [failed] = trials(sqlite_url, flag)
    assert "not a number" in failed.user_attrs["error"]
    listing = run_cli("hpo-inspect", "--format", "json", url=sqlite_url).stdout
    assert '"failed"' in listing and '"done"' in listing


def test_a_preloaded_module_is_imported_once_before_any_study_exists(
    sqlite_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """``hpo-worker --preload MODULE``: the session process imports it as it starts, while the
    worker waits for work; the study's session then runs from that import, not a second one."""
    imports, log = tmp_path / "imports.log", tmp_path / "w.log"
    allowed = {"HPO_SESSION_MODULES": "tests.preload_probe"}
    worker = subprocess.Popen(
        [str(BIN / "hpo-worker"), "--preload", "no_such_module,tests.preload_probe",
         "--idle-exit", "3"],
        env=cli_env(sqlite_url, HPO_TEST_PRELOAD_LOG=str(imports), **allowed), cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True, start_new_session=True,
    )  # fmt: skip
    procs.append(worker)
    # imported while there is no study at all: the config is not even written yet
    wait_until("the preload", lambda: imports.exists() and imports.read_text().strip() != "")
    config = make_config(session="tests.preload_probe:pid")
    config["study"]["n_trials"] = 2
    created = run_cli(
        "hpo-coordinator", "create", str(write_config(tmp_path / "c.yaml", config)),
        url=sqlite_url, HPO_TEST_PRELOAD_LOG=str(tmp_path / "coordinator.log"), **allowed,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert worker.wait(timeout=120) == 0, log.read_text()[-3000:]
    lines = imports.read_text().splitlines()
    assert len(lines) == 1  # imported once, by the preload
    assert "cannot preload 'no_such_module': ModuleNotFoundError" in log.read_text()  # said, on
    done = trials(sqlite_url, "test-study")
    assert [t.state.name for t in done] == ["COMPLETE", "COMPLETE"]
    assert {t.values[0] for t in done} == {float(lines[0].split()[0])}  # and run from there
