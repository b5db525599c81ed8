"""More workers than connections: 64, 128 and 256 worker processes on one PostgreSQL with
``max_connections = 100``, directly and through PgBouncer, hpo and plain Optuna side by side.

    python bench/fleet.py [--quick] [--output docs/BENCHMARKS.md]

Every run gets a PostgreSQL server of its own (initdb, its own port, stock settings): filling
its connections disturbs no other client of this host. Through the pooler, a PgBouncer of its
own runs in front of it with its default settings but transaction pooling, 24 server
connections and room for every client (``tests/pgbouncer.py``). Each run is a study of
``2 x workers`` trials of 0.5 s (TPE, one float), the workers started with the study there.

Measured: the server's peak connections (``pg_stat_activity``, sampled every 0.1 s, this
script's own one included), finished trials per second from the first trial's start to the
last one's end, failed trials, worker processes that exited with an error and tracebacks in
their logs. Plain Optuna
runs ``study.optimize`` in as many processes (``bench/plain_optuna_worker.py``): directly it
needs more connections than the server has (each process holds two: its trials' and its
heartbeat's), so its side is measured through the pooler only.

The script rewrites the section between the markers in ``--output``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import (  # noqa: E402
    BIN,
    ROOT,
    coordinator,
    env,
    hpo_config,
    plain_worker_cmd,
    replace_section,  # noqa: E402
)
from bench.run import _utc as utc_seconds  # noqa: E402
from tests.pgbouncer import PgBouncer  # noqa: E402
from tests.private_postgres import PrivatePostgres  # noqa: E402

START, END = "<!-- fleet:start -->", "<!-- fleet:end -->"
SLEEP_S = 0.5
POOL_SIZE = 24  # PgBouncer's server connections
MAX_CONNECTIONS = 100  # PostgreSQL's default, which PrivatePostgres keeps


def _database(server_url: str) -> str:
    """A fresh database on the private server (not its maintenance database)."""
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text("CREATE DATABASE fleet"))
    admin.dispose()
    return sa.engine.make_url(server_url).set(database="fleet").render_as_string(False)


def _start(plain: bool, url: str, workers: int, trials: int, tmp: Path) -> list[Any]:
    if plain:
        optuna.create_study(study_name="bench", storage=url)
        cmds = [plain_worker_cmd(url, trials, SLEEP_S, i) for i in range(workers)]
    else:
        coordinator(url, "create", str(hpo_config(tmp, "bench", trials, SLEEP_S)))
        cmds = [[str(BIN / "hpo-worker"), "--processes", str(workers), "--idle-exit", "3"]]
    logs = [open(tmp / f"worker-{i}.log", "w") for i in range(len(cmds))]  # noqa: SIM115
    procs = [
        subprocess.Popen(
            cmd,
            env=env(url),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,  # a group of its own: a pool's children end with it
        )  # fmt: skip
        for cmd, log in zip(cmds, logs, strict=True)
    ]
    for log in logs:
        log.close()
    return procs


def run(plain: bool, pooled: bool, workers: int, trials: int) -> dict[str, Any]:
    server = PrivatePostgres()
    bouncer: PgBouncer | None = None
    procs: list[Any] = []
    try:
        server.start()
        url = _database(server.url)
        if pooled:
            bouncer = PgBouncer(server.url, pool_size=POOL_SIZE)
            bouncer.start()
            url = bouncer.url("fleet")
        admin = sa.create_engine(server.url, poolclass=sa.pool.NullPool)
        count = sa.text(
            "select count(*) from pg_stat_activity where backend_type = 'client backend'"
        )
        # One connection, taken before the workers fill the server, for the whole run.
        with admin.connect() as conn, tempfile.TemporaryDirectory() as tmp:
            limit = int(conn.execute(sa.text("show max_connections")).scalar_one())
            assert limit == MAX_CONNECTIONS, limit
            procs = _start(plain, url, workers, trials, Path(tmp))
            peak, deadline = 0, time.monotonic() + 1800
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                peak = max(peak, int(conn.execute(count).scalar_one()))
                conn.rollback()  # a fresh snapshot of pg_stat_activity each time
                time.sleep(0.1)
            errors = sum(p.poll() != 0 for p in procs)
            text = "".join(path.read_text() for path in Path(tmp).glob("worker-*.log"))
        admin.dispose()
        storage = optuna.storages.RDBStorage(
            sa.engine.make_url(server.url).set(database="fleet").render_as_string(False),
            skip_table_creation=True,
        )
        frozen = optuna.load_study(study_name="bench", storage=storage).get_trials(deepcopy=False)
        storage.engine.dispose()
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        if bouncer is not None:
            bouncer.cleanup()
        server.cleanup()
    states = Counter(t.state.name for t in frozen)
    ends = [utc_seconds(t.datetime_complete) for t in frozen if t.datetime_complete]
    starts = [utc_seconds(t.datetime_start) for t in frozen if t.datetime_start]
    span = max(ends) - min(starts) if ends else float("nan")
    return {
        "peak": peak,
        "per_s": (states["COMPLETE"] / span) if span == span and span > 0 else float("nan"),
        "complete": states["COMPLETE"],
        "failed": states["FAIL"],
        # A pool restarts a worker process that died and still exits 0: its log says so.
        "errors": f"{errors + text.count('died with status')} / {text.count('Traceback')}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's)")
    parser.add_argument("--output", type=Path, help="rewrite this file's fleet section")
    args = parser.parse_args()
    # SIGTERM (a test's timeout, Ctrl-C's cousin) unwinds like an error: every private server,
    # pooler and worker this script started is ended by the ``finally`` of ``run``.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    counts = (4,) if args.quick else (64, 128, 256)
    load = open("/proc/loadavg").read().split()[0]
    lines = [
        START,
        "## More workers than connections",
        "",
        f"Produced by `python bench/fleet.py` on {time.strftime('%Y-%m-%d')}: a private "
        f"PostgreSQL with the stock `max_connections = {MAX_CONNECTIONS}` on this host "
        f"({os.cpu_count()} cores, shared by the server, the pooler, every worker and executor "
        f"process), a study of 2 x workers trials of {SLEEP_S} s each, PgBouncer in "
        f"transaction mode with {POOL_SIZE} server connections; one run each, load average "
        f"{load} at the start. Trials/s: finished trials over the time from the first trial's "
        "start to the last one's end (the other workers' start-up overlaps it). On this host "
        "the fleet is CPU-bound: a trial's 0.5 s of sleep is not the limit. Plain Optuna runs "
        "through the pooler only: directly, each of its processes holds two connections (its "
        "trials' and its heartbeat's), and the 64-worker `connections` row above shows what a "
        "full server does to it.",
        "",
        "| workers | path | peak server connections | trials/s | complete / budget | FAIL "
        "| workers exited with an error / tracebacks |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for workers in counts:
        trials = 2 * workers
        for label, plain, pooled in (
            ("hpo, direct", False, False),
            ("hpo, PgBouncer", False, True),
            ("plain Optuna, PgBouncer", True, True),
        ):
            r = run(plain, pooled, workers, trials)
            lines.append(
                f"| {workers} | {label} | {r['peak']} | {r['per_s']:.1f} "
                f"| {r['complete']} / {trials} | {r['failed']} | {r['errors']} |"
            )
            print(lines[-1], flush=True)
    lines.append(END)
    if args.output:
        replace_section(args.output, START, END, "\n".join(lines))


if __name__ == "__main__":
    main()
