"""hpo against plain Optuna on the same PostgreSQL, side by side in one run.

    python bench/run.py [--quick] [--repeats N] [--output docs/BENCHMARKS.md]

Each row runs A (hpo) and B (plain Optuna) alternately, ``--repeats`` times each, and reports
medians and the A/B ratio: these machines are noisy, so only ratios measured together count.
Every run gets a fresh database on the server named by HPO_BENCH_PG_URL (default: the local
one). ``--quick`` shrinks every size so that the test suite can check the script never rots.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ADMIN_URL = os.environ.get(
    "HPO_BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
optuna.logging.set_verbosity(optuna.logging.WARNING)


@contextmanager
def fresh_database() -> Iterator[str]:
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    name = f"hpo_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield (
            sa.engine.make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        )
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def env(url: str) -> dict[str, str]:
    return {**os.environ, "HPO_STORAGE": url, "PYTHONUNBUFFERED": "1"}


def coordinator(url: str, *args: str) -> None:
    subprocess.run(
        [str(BIN / "hpo-coordinator"), *args],
        env=env(url),
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


def hpo_config(
    tmp: Path,
    name: str,
    n_trials: int,
    sleep_s: float,
    session: str = "experiments.benchmarks:quadratic",
    space: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    config = {
        "study": {
            "name": name, "direction": "minimize", "n_trials": n_trials,
            "sampler": {"name": "tpe", "seed": seed, "options": {"n_startup_trials": 10}},
        },
        "session": session,
        "static": {"sleep_s": sleep_s},
        "search_space": space or {"x": {"type": "float", "low": -5.0, "high": 5.0}},
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def add_history(url: str, name: str, n: int, seed: int = 0) -> None:
    """Fill a study with ``n`` finished trials, as if it had run for a while."""
    rng = random.Random(seed)
    dist = optuna.distributions.FloatDistribution(-5.0, 5.0)
    study = optuna.load_study(study_name=name, storage=url)
    trials = []
    for _ in range(n):
        x = rng.uniform(-5, 5)
        trials.append(
            optuna.trial.create_trial(
                params={"x": x}, distributions={"x": dist}, value=(x - 2) ** 2
            )
        )
    study.add_trials(trials)


def finished(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    finally:
        storage.engine.dispose()


def span_s(trials: list[optuna.trial.FrozenTrial]) -> float:
    start = min(t.datetime_start for t in trials if t.datetime_start)
    end = max(t.datetime_complete for t in trials if t.datetime_complete)
    return (end - start).total_seconds()


# --- A: hpo --------------------------------------------------------------------------------------


def run_hpo_pool(n_workers: int, n_trials: int, sleep_s: float, **config: Any) -> dict[str, Any]:
    """Workers wait first; the clock runs from `hpo-coordinator create` to the last trial."""
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        name = "bench"
        path = hpo_config(Path(tmp), name, n_trials, sleep_s, **config)
        coordinator(url, "create", str(path), "--name", "warmup")  # the schema
        coordinator(url, "stop", "warmup")
        pool = subprocess.Popen(
            [str(BIN / "hpo-worker"), "--processes", str(n_workers)],
            env=env(url), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(2 + n_workers * 0.1)  # all workers up and waiting
        coordinator(url, "create", str(path))
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        query = sa.text(
            "select count(*) from trials t join studies s on s.study_id = t.study_id "
            "where s.study_name = :n and t.state in ('COMPLETE', 'PRUNED')"
        )
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                if conn.execute(query, {"n": name}).scalar_one() >= n_trials:
                    break
            time.sleep(0.1)
        with engine.connect() as conn:  # "from create": the study's registration, DB clock
            created = conn.execute(
                sa.text("select created_at from hpo_studies where study_name = :n"), {"n": name}
            ).scalar_one()
        engine.dispose()
        pool.send_signal(signal.SIGTERM)
        pool.wait(timeout=120)
        trials = finished(url, name)
        last = max(t.datetime_complete for t in trials if t.datetime_complete)
        done = sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
        return {
            "trials": done,
            "best": min(t.value for t in trials if t.value is not None),
            "span_s": span_s(trials),
            "wall_s": _utc(last) - created,  # Optuna stores naive UTC
        }


def _utc(naive: Any) -> float:
    import datetime as dt

    return float(naive.replace(tzinfo=dt.timezone.utc).timestamp())


# --- B: plain Optuna -----------------------------------------------------------------------------


def plain_worker_cmd(url: str, n_trials: int, sleep_s: float | str, seed: int) -> list[str]:
    script = str(ROOT / "bench" / "plain_optuna_worker.py")
    return [sys.executable, script, url, "bench", str(n_trials), str(sleep_s), str(seed)]


def run_plain_pool(n_workers: int, n_trials: int, sleep_s: float) -> dict[str, Any]:
    with fresh_database() as url:
        optuna.create_study(study_name="bench", storage=url)
        procs = [
            subprocess.Popen(
                plain_worker_cmd(url, n_trials, str(sleep_s), i),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for i in range(n_workers)
        ]
        errors = sum(p.wait() != 0 for p in procs)
        trials = finished(url, "bench")
        done = sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
        return {"trials": done, "span_s": span_s(trials), "errors": errors}


# --- rows ----------------------------------------------------------------------------------------


# --- start-up, growth, connections -------------------------------------------------------------


def startup(plain: bool) -> float:
    """Seconds from a worker process's start to its first trial, the study already open."""
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        if plain:
            optuna.create_study(study_name="bench", storage=url)
            cmd = plain_worker_cmd(url, 3, 0, 0)
        else:
            path = hpo_config(Path(tmp), "bench", 3, 0.0)
            coordinator(url, "create", str(path))
            cmd = [str(BIN / "hpo-worker"), "--idle-exit", "0.5"]
        started = time.time()
        subprocess.run(cmd, env=env(url), cwd=ROOT, check=True, capture_output=True, timeout=120)
        first = min(t.datetime_start for t in finished(url, "bench") if t.datetime_start)
        return _utc(first) - started


def growth(plain: bool, history: int, m: int) -> float:
    """Per-trial seconds of one in-process worker on a study that already holds ``history``."""
    from hpo_framework.config import load_config
    from hpo_framework.coordinator import create_study
    from hpo_framework.executor import ProcessExecutor
    from hpo_framework.heartbeat import Heartbeat
    from hpo_framework.storage import open_storage
    from hpo_framework.trials import StudyHandle

    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        if plain:
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=5, grace_period=20,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
            )  # fmt: skip
            study = optuna.create_study(
                study_name="bench", storage=storage,
                sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=10),
            )  # fmt: skip
            add_history(url, "bench", history)
            states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            callbacks = [optuna.study.MaxTrialsCallback(history + m, states=states)]
            objective = lambda t: (t.suggest_float("x", -5.0, 5.0) - 2) ** 2  # noqa: E731
            study.optimize(objective, n_trials=1, callbacks=callbacks)  # warm the cache
            started = time.perf_counter()
            study.optimize(objective, n_trials=m - 1, callbacks=callbacks)
            elapsed = time.perf_counter() - started
            storage.engine.dispose()
            return elapsed / (m - 1)
        config = load_config(hpo_config(Path(tmp), "bench", m, 0.0))
        rdb = open_storage(url, create_schema=True)
        record = create_study(rdb, config, check_session=False)
        add_history(url, "bench", history)
        executor = ProcessExecutor()  # as in a worker: the session in its executor process
        handle = StudyHandle(rdb, record, config, executor, worker_id="bench")
        with Heartbeat(rdb) as heartbeat:
            handle.run_one(heartbeat)  # warm the cache
            started = time.perf_counter()
            for _ in range(m - 1):
                handle.run_one(heartbeat)
            elapsed = time.perf_counter() - started
        executor.close()
        rdb.engine.dispose()
        return elapsed / (m - 1)


def executor_hop(calls: int) -> dict[str, float]:
    """Milliseconds per session call through the executor process and in-process, and seconds
    from starting an executor to the session imported there (beside the worker's own start)."""
    from experiments.benchmarks import quadratic
    from hpo_framework.executor import InProcessExecutor, ProcessExecutor

    class NoLink:
        def report(self, value: float, step: int) -> None:
            pass

    ref, cfg = "experiments.benchmarks:quadratic", {"x": 1.0}
    started = time.perf_counter()
    process = ProcessExecutor()
    process.check(ref)
    start_s = time.perf_counter() - started
    per_call = {}
    try:
        for name, executor in (("process", process), ("inline", InProcessExecutor(quadratic))):
            executor.run(ref, cfg, NoLink(), 1, None)  # warm
            t0 = time.perf_counter()
            for _ in range(calls):
                executor.run(ref, cfg, NoLink(), 1, None)
            per_call[name] = (time.perf_counter() - t0) / calls * 1000
    finally:
        process.close()
    return {"start_s": start_s, **per_call}


def connections(plain: bool, n_workers: int, n_trials: int) -> dict[str, Any]:
    """Peak connections to the study's database and workers that failed, at ``n_workers``."""
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        database = sa.engine.make_url(url).database
        if plain:
            optuna.create_study(study_name="bench", storage=url)
            procs = [
                subprocess.Popen(
                    plain_worker_cmd(url, n_trials, "0.2", i),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
                for i in range(n_workers)
            ]
        else:
            path = hpo_config(Path(tmp), "bench", n_trials, 0.2)
            coordinator(url, "create", str(path))
            procs = [
                subprocess.Popen(
                    [str(BIN / "hpo-worker"), "--processes", str(n_workers), "--idle-exit", "2"],
                    env=env(url),
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )  # fmt: skip
            ]
        admin = sa.create_engine(ADMIN_URL, poolclass=sa.pool.NullPool)
        query = sa.text("select count(*) from pg_stat_activity where datname = :d")
        peak = 0
        while any(p.poll() is None for p in procs):
            try:
                with admin.connect() as conn:
                    peak = max(peak, int(conn.execute(query, {"d": database}).scalar_one()))
            except sa.exc.OperationalError:
                pass  # the server is full: that is what is being measured
            time.sleep(0.1)
        admin.dispose()
        if plain:
            errors = sum(p.returncode != 0 for p in procs)
        else:
            log = procs[0].stderr.read() if procs[0].stderr else ""
            errors = log.count("Traceback") + (procs[0].returncode != 0)
        done = sum(t.state.name == "COMPLETE" for t in finished(url, "bench"))
        return {"peak": peak, "errors": errors, "complete": done}


SPACES = {
    "branin": ("experiments.benchmarks:branin", {
        "x1": {"type": "float", "low": -5.0, "high": 10.0},
        "x2": {"type": "float", "low": 0.0, "high": 15.0}}),
    "hartmann6": ("experiments.benchmarks:hartmann6", {
        f"x{i}": {"type": "float", "low": 0.0, "high": 1.0} for i in range(1, 7)}),
}  # fmt: skip


def quality(function: str, workers: int, seed: int, n: int) -> float:
    session, space = SPACES[function]
    return float(run_hpo_pool(workers, n, 0.02, session=session, space=space, seed=seed)["best"])


def max_connections() -> int:
    admin = sa.create_engine(ADMIN_URL, poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        value = int(conn.execute(sa.text("show max_connections")).scalar_one())
    admin.dispose()
    return value


def paired(
    repeats: int, a: Callable[[], dict[str, Any]], b: Callable[[], dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ra, rb = [], []
    for _ in range(repeats):
        ra.append(a())
        rb.append(b())
    return ra, rb


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    q = args.quick
    repeats = 1 if q else args.repeats
    lines: list[str] = []

    # Overhead: one worker, trivial objective, trials per second over the run's own span.
    n = 20 if q else 200
    a, b = paired(repeats, lambda: run_hpo_pool(1, n, 0.0), lambda: run_plain_pool(1, n, 0.0))
    tps_a, tps_b = (n - 1) / median(a, "span_s"), (n - 1) / median(b, "span_s")
    lines.append(
        f"| overhead | trials/s, 1 worker, {n} trials of a trivial objective (TPE) | "
        f"{tps_a:.1f} | {tps_b:.1f} | {tps_a / tps_b:.2f}x |"
    )

    # Scaling and exact budget: 16 workers, 160 trials of 0.5 s; ideal 5 s.
    w, n, s = (4, 8, 0.2) if q else (16, 160, 0.5)
    ideal = n * s / w
    a, b = paired(repeats, lambda: run_hpo_pool(w, n, s), lambda: run_plain_pool(w, n, s))
    lines.append(
        f"| scaling | {w} workers, {n} trials of {s} s: time / ideal {ideal:.1f} s "
        f"(hpo: from create; Optuna: first to last trial) | {median(a, 'wall_s') / ideal:.3f} | "
        f"{median(b, 'span_s') / ideal:.3f} | |"
    )
    lines.append(
        f"| budget | trials finished beyond n_trials={n} at {w} workers (max over runs) | "
        f"{max(r['trials'] for r in a) - n} | {max(r['trials'] for r in b) - n} | |"
    )

    # Start-up: worker process start to its first trial.
    a, b = paired(repeats, lambda: {"s": startup(False)}, lambda: {"s": startup(True)})
    lines.append(
        f"| start-up | seconds from worker process start to its first trial | "
        f"{median(a, 's'):.2f} | {median(b, 's'):.2f} | {median(b, 's') / median(a, 's'):.2f}x |"
    )

    # The executor process (sessions run outside the worker): its cost per call and at start.
    hops = [executor_hop(50 if q else 500) for _ in range(repeats)]
    lines.append(
        f"| executor hop | ms per session call through the executor process (hpo) vs a call in "
        f"the same process | {median(hops, 'process'):.3f} | {median(hops, 'inline'):.3f} | |"
    )
    lines.append(
        f"| executor start | seconds from starting the executor to the session imported there "
        f"(runs beside the worker's own start) | {median(hops, 'start_s'):.2f} | - | |"
    )

    # Growth: per-trial time with 5,000 trials already in the study vs 100 (TPE).
    big, m = (300, 10) if q else (5000, 30)
    ga = growth(False, big, m) / growth(False, 100, m)
    gb = growth(True, big, m) / growth(True, 100, m)
    lines.append(
        f"| growth | per-trial time at {big} vs 100 trials already in the study (TPE), ratio | "
        f"{ga:.2f} | {gb:.2f} | |"
    )

    # Connections: 64 workers against the server's max_connections (plain Optuna only in full
    # runs: it exhausts the server, which would disturb anything else using it).
    n_workers = 8 if q else 64
    ca = connections(False, n_workers, n_workers * 2)
    cb = {"peak": "-", "errors": "-"} if q else connections(True, n_workers, n_workers * 2)
    lines.append(
        f"| connections | {n_workers} workers: peak server connections / workers failed "
        f"(max_connections = {max_connections()}) | {ca['peak']} / {ca['errors']} | "
        f"{cb['peak']} / {cb['errors']} | |"
    )

    # Search quality: best after N trials, 8 workers vs 1, several seeds (median [min, max]).
    n, seeds, w = (20, 2, 2) if q else (100, 5, 8)
    quality_lines = []
    for function, optimum in (("branin", 0.397887), ("hartmann6", -3.32237)):
        results = {}
        for workers in (1, w):
            values = sorted(quality(function, workers, seed, n) for seed in range(seeds))
            results[workers] = (
                f"{statistics.median(values):.4f} [{values[0]:.4f}, {values[-1]:.4f}]"
            )
        quality_lines.append(f"| {function} | {optimum} | {results[1]} | {results[w]} |")

    table = "\n".join(
        ["| row | measure | hpo | plain Optuna | hpo / Optuna |", "|---|---|---|---|---|", *lines]
    )
    table += (
        f"\n\nSearch quality: best value after {n} trials (TPE, constant liar), median "
        f"[min, max] over {seeds} seeds.\n\n| function | optimum | 1 worker | {w} workers |\n"
        "|---|---|---|---|\n" + "\n".join(quality_lines)
    )
    header = (
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} with {os.cpu_count()} "
        f"cores, Python {platform.python_version()}, Optuna {optuna.__version__}, "
        f"PostgreSQL on localhost; medians of {repeats} paired run(s){' (--quick)' if q else ''}."
    )
    print(header + "\n\n" + table)
    if not q:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            f"# Benchmarks\n\nProduced by `make bench` (bench/run.py); what the numbers mean is "
            f"in the README's Benchmarks section.\n\n{header}\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
