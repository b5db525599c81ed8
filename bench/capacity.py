"""What a worker costs the database, measured, and what that means for 100 to 10,000 workers.

    python bench/capacity.py [--quick] [--output docs/BENCHMARKS.md]

Measured on a fresh database of the local server (HPO_BENCH_PG_URL), with every PostgreSQL
process's CPU read from /proc:

* **per trial**: server CPU, client CPU and database bytes per finished trial, 16 workers,
  TPE, for hpo and, in the same run, plain Optuna (``study.optimize`` in as many processes);
* **per running worker**: server CPU per worker-second while every worker runs a long trial
  (heartbeats, sweeps, presence): the load that does not shrink with longer trials;
* **per idle worker**: server CPU per worker-second while workers wait with no work
  (they poll every ``HPO_IDLE_POLL_MAX`` seconds, 0.25 by default).

From those, ``capacity_rows`` derives the table in docs/BENCHMARKS.md: for 100, 1,000 and
10,000 workers, the shortest trial that keeps a 16-core database server under half load, the
PgBouncer server connections (Little's law on the measured server time, times two), and the
database's growth per million trials. The script rewrites the section between the markers in
``--output``; the rest of that file is bench/run.py's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import (  # noqa: E402
    BIN,
    ROOT,
    _wait_for,
    coordinator,
    env,
    fresh_database,
    hpo_config,
    postgres_cpu_s,
    replace_section,
    start_plain_workers,
    tree_cpu_s,
)

START, END = "<!-- capacity:start -->", "<!-- capacity:end -->"
SERVER_CORES = 16  # the database server the table is sized for
ROUND_TRIP_MS = 0.5  # a LAN round trip between a worker and the database (or its pooler)
STATEMENTS_PER_TRIAL = 8  # tests/pool/test_db_cost.py counts them; README: 8 per trial


def _size(url: str) -> int:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        size = int(conn.execute(sa.text("select pg_database_size(current_database())")).scalar())
    engine.dispose()
    return size


def _pool(
    url: str, workers: int, poll_max: float | None = None
) -> tuple[subprocess.Popen[str], Path]:
    log = Path(tempfile.mkstemp(prefix="hpo-capacity-", suffix=".log")[1])
    with log.open("w") as out:
        pool = subprocess.Popen(
            [str(BIN / "hpo-worker"), "--processes", str(workers)],
            env={**env(url), **({"HPO_IDLE_POLL_MAX": str(poll_max)} if poll_max else {})},
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    _wait_for("workers", lambda: log.read_text().count("waiting for work") >= workers, 300)
    return pool, log


def _stop(pool: subprocess.Popen[str], log: Path) -> None:
    for _ in range(2):  # the second signal stops cold: a long trial is not waited for
        if pool.poll() is None:
            pool.terminate()
            try:
                pool.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
    pool.wait(timeout=120)
    log.unlink(missing_ok=True)


def per_trial(workers: int, trials: int) -> dict[str, float]:
    """Server and client CPU and bytes per finished trial of an hpo pool (0.1 s trials)."""
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        path = hpo_config(Path(tmp), "capacity", trials, 0.1)
        coordinator(url, "create", str(path), "--name", "warmup")
        coordinator(url, "stop", "warmup")
        before_size = _size(url)
        pool, log = _pool(url, workers)
        try:
            client, server = tree_cpu_s([pool.pid]), postgres_cpu_s()
            coordinator(url, "create", str(path))
            engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            query = sa.text("select count(*) from trials where state = 'COMPLETE'")

            def done() -> bool:
                with engine.connect() as conn:
                    return int(conn.execute(query).scalar_one()) >= trials

            _wait_for("the study", done, timeout=1800)
            engine.dispose()
            client, server = tree_cpu_s([pool.pid]) - client, (postgres_cpu_s()) - server
        finally:
            _stop(pool, log)
        grown = _size(url) - before_size
    return {
        "server_ms": 1000 * server / trials,
        "client_ms": 1000 * client / trials,
        "bytes": grown / trials,
    }


def plain_per_trial(workers: int, trials: int) -> dict[str, float]:
    """The same for plain Optuna workers (bench/plain_optuna_worker.py), waiting alike."""
    import optuna

    with fresh_database() as url:
        optuna.create_study(study_name="warmup", storage=url)  # the schema
        before_size = _size(url)
        procs = start_plain_workers(url, workers, trials, 0.1)
        try:
            server = postgres_cpu_s()
            optuna.create_study(study_name="bench", storage=url)
            while any(p.poll() is None for p in procs):
                time.sleep(0.05)
            server = postgres_cpu_s() - server
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        grown = _size(url) - before_size
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
        done = sum(t.state.is_finished() for t in optuna.load_study(
            study_name="bench", storage=storage).get_trials(deepcopy=False))  # fmt: skip
        storage.engine.dispose()
    return {"server_ms": 1000 * server / done, "bytes": grown / done}


def per_worker_second(
    workers: int, seconds: float, running: bool, poll_max: float | None = None
) -> float:
    """Server CPU ms per worker-second while every worker runs a long trial (``running``) or
    waits with no work."""
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        coordinator(url, "create", str(hpo_config(Path(tmp), "warmup", 1, 0.0)), "--name", "w")
        coordinator(url, "stop", "w")
        pool, log = _pool(url, workers, poll_max)
        try:
            if running:
                path = hpo_config(Path(tmp), "long", workers, 3600.0)
                coordinator(url, "create", str(path))
                _wait_for(
                    "every worker to run a trial",
                    lambda: log.read_text().count("serving study") >= workers,
                    300,
                )
                time.sleep(5)  # past the trials' start
            server = postgres_cpu_s()
            time.sleep(seconds)
            server = (postgres_cpu_s()) - server
        finally:
            _stop(pool, log)
    return 1000 * server / (workers * seconds)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def capacity_rows(m: dict[str, float]) -> list[str]:
    """The derived table: per fleet size, the trial length, pooler size and growth."""
    rows = [
        "| workers | idle load, cores (`HPO_IDLE_POLL_MAX=5`) | shortest trial for < 50% of a "
        f"{SERVER_CORES}-core server | PgBouncer server connections | client connections "
        "| database growth per 1M trials |",
        "|---|---|---|---|---|---|",
    ]
    for workers in (100, 1_000, 10_000):
        budget_ms = SERVER_CORES / 2 * 1000  # server CPU ms per second at half load
        idle = workers * m["idle_ms_s"] / 1000
        idle_slow = workers * m["idle_slow_ms_s"] / 1000
        spare = budget_ms - workers * m["running_ms_s"]  # after heartbeats and sweeps
        trial = "never (heartbeats alone exceed it)" if spare <= 0 else (
            f"{workers * m['server_ms'] / spare:.1f} s"
        )  # fmt: skip
        # Little's law at the shortest trial: trials/s x server-side time per trial, x2.
        per_second = spare / m["server_ms"] if spare > 0 else 0.0
        busy_s = (m["server_ms"] + STATEMENTS_PER_TRIAL * ROUND_TRIP_MS) / 1000
        pool = max(2 * SERVER_CORES, round(2 * per_second * busy_s))
        rows.append(
            f"| {workers:,} | {idle:.2f} ({idle_slow:.2f}) | {trial} | {pool} "
            f"| {workers:,} (1 per process) "
            f"| {m['bytes'] * 1e6 / 1e9:.1f} GB |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's)")
    parser.add_argument("--output", type=Path, help="rewrite this file's capacity section")
    args = parser.parse_args()
    workers, trials, seconds = (2, 12, 2.0) if args.quick else (16, 320, 20.0)
    load = open("/proc/loadavg").read().split()[0]
    hpo = per_trial(workers, trials)
    plain = plain_per_trial(workers, trials)
    m = {
        **hpo,
        "plain_server_ms": plain["server_ms"],
        "running_ms_s": per_worker_second(workers, seconds, running=True),
        "idle_ms_s": per_worker_second(workers, seconds, running=False),
        "idle_slow_ms_s": per_worker_second(workers, seconds, running=False, poll_max=5.0),
    }
    lines = [
        START,
        "## Capacity",
        "",
        f"Produced by `python bench/capacity.py` on {time.strftime('%Y-%m-%d')}: {workers} "
        f"worker processes, PostgreSQL on localhost, load average {load} at the start.",
        "",
        "| measured | hpo | plain Optuna | hpo / Optuna |",
        "|---|---|---|---|",
        f"| server CPU per trial, ms (TPE, {trials} trials) | {m['server_ms']:.1f} "
        f"| {m['plain_server_ms']:.1f} | {_ratio(m['server_ms'], m['plain_server_ms'])} |",
        f"| database bytes per trial (one float parameter, no metrics) | {m['bytes']:.0f} "
        f"| {plain['bytes']:.0f} | {_ratio(m['bytes'], plain['bytes'])} |",
        f"| server CPU per running worker, ms per second (heartbeat 5 s, sweeps) "
        f"| {m['running_ms_s']:.2f} | | |",
        f"| server CPU per idle worker, ms per second (polls every 0.25 s) "
        f"| {m['idle_ms_s']:.2f} | | |",
        f"| the same with `HPO_IDLE_POLL_MAX=5` (polls every 5 s) "
        f"| {m['idle_slow_ms_s']:.2f} | | |",
        "",
        f"What it means for a {SERVER_CORES}-core database server, from the rows above: idle "
        "load is what a fleet costs while it waits; the shortest trial keeps the server under "
        "half load with every worker busy; PgBouncer's server connections follow from Little's "
        f"law on the server time per trial plus {STATEMENTS_PER_TRIAL} round trips of "
        f"{ROUND_TRIP_MS} ms, doubled, and at least twice the cores.",
        "",
        *capacity_rows(m),
        END,
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        replace_section(args.output, START, END, text)


if __name__ == "__main__":
    main()
