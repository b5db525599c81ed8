"""hpo against plain Optuna on the same PostgreSQL, side by side in one run.

    python bench/run.py [--quick] [--repeats N] [--output docs/BENCHMARKS.md]

Each row runs A (hpo) and B (plain Optuna) alternately, ``--repeats`` times each, and reports
medians and the A/B ratio: these machines are noisy, so only ratios measured together count.
Beside the times, each side's per-trial database cost is *counted* (statements, transactions)
and its CPU measured (client process, and the PostgreSQL server's processes when the server
is local). Every run gets a fresh database on the server named by HPO_BENCH_PG_URL (default:
the local one). ``--quick`` shrinks every size so that the test suite can check the script
never rots.

Pools are timed alike: both sides' workers are started and waiting before the study exists;
the clock runs from the study's creation to its last finished trial.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench.sql_counter, when run as a script
BIN = Path(sys.executable).parent
ADMIN_URL = os.environ.get(
    "HPO_BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


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
    sampler: str = "tpe",
    static: dict[str, Any] | None = None,
) -> Path:
    options = {"n_startup_trials": 10} if sampler == "tpe" else {}
    config = {
        "study": {
            "name": name, "direction": "minimize", "n_trials": n_trials,
            "sampler": {"name": sampler, "seed": seed, "options": options},
        },
        "session": session,
        "static": {"sleep_s": sleep_s, **(static or {})},
        "search_space": space or {"x": {"type": "float", "low": -5.0, "high": 5.0}},
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def replace_section(path: Path, start: str, end: str, text: str) -> None:
    """Put ``text`` (markers included) in place of the section between ``start`` and ``end``
    of ``path``, or append it: each script owns its section of docs/BENCHMARKS.md."""
    old = path.read_text() if path.exists() else ""
    if start in old:
        section = re.escape(start) + ".*?" + re.escape(end)
        new = re.sub(section, lambda _: text, old, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


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


# --- pools: both sides' workers wait, then the study is created ---------------------------------


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_hpo_pool(
    n_workers: int, n_trials: int, sleep_s: float, study_config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """hpo workers wait for work; the clock runs from the study's registration (database
    clock) to its last finished trial."""
    config = study_config or {}
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        name = "bench"
        path = hpo_config(Path(tmp), name, n_trials, sleep_s, **config)
        coordinator(url, "create", str(path), "--name", "warmup")  # the schema
        coordinator(url, "stop", "warmup")
        log = Path(tmp) / "pool.log"
        with log.open("w") as out:
            pool = subprocess.Popen(
                [str(BIN / "hpo-worker"), "--processes", str(n_workers)],
                env=env(url), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            waiting = "waiting for work"
            _wait_for("workers", lambda: log.read_text().count(waiting) >= n_workers)
            cpu = tree_cpu_s([pool.pid]), server_cpu_s()
            coordinator(url, "create", str(path))
            # One connection polls: a new one every 50 ms would start a server process each
            # time, CPU that counted against hpo's side (the plain side is not polled).
            engine = sa.create_engine(url, pool_size=1)
            query = sa.text(
                "select count(*) from trials t join studies s on s.study_id = t.study_id "
                "where s.study_name = :n and t.state in ('COMPLETE', 'PRUNED')"
            )

            def done() -> bool:
                with engine.connect() as conn:
                    return int(conn.execute(query, {"n": name}).scalar_one()) >= n_trials

            _wait_for("the study", done, timeout=900)
            cpu = tree_cpu_s([pool.pid]) - cpu[0], _minus(server_cpu_s(), cpu[1])
            with engine.connect() as conn:
                created = conn.execute(
                    sa.text("select created_at from hpo_studies where study_name = :n"),
                    {"n": name},
                ).scalar_one()
            engine.dispose()
        finally:
            pool.send_signal(signal.SIGTERM)
            pool.wait(timeout=120)
        return {**_pool_result(url, name, created), "client_cpu_s": cpu[0], "server_cpu_s": cpu[1]}


def _minus(after: float | None, before: float | None) -> float:
    return float("nan") if after is None or before is None else after - before


def run_plain_pool(n_workers: int, n_trials: int, sleep_s: float) -> dict[str, Any]:
    """Plain Optuna workers connect and wait for the study; the clock runs from its creation
    to its last finished trial."""
    with fresh_database() as url:
        optuna.create_study(study_name="warmup", storage=url)  # the schema
        procs = start_plain_workers(url, n_workers, n_trials, sleep_s)
        try:
            ready = tree_cpu_s([p.pid for p in procs])  # their start-up, outside the clock
            children, server = resource.getrusage(resource.RUSAGE_CHILDREN), server_cpu_s()
            optuna.create_study(study_name="bench", storage=url)
            created = time.time()
            errors = sum(p.wait(timeout=900) != 0 for p in procs)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            client = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
            cpu = client - ready, _minus(server_cpu_s(), server)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return {
            **_pool_result(url, "bench", created), "errors": errors,
            "client_cpu_s": cpu[0], "server_cpu_s": cpu[1],
        }  # fmt: skip


def start_plain_workers(
    url: str, n_workers: int, n_trials: int, sleep_s: float, module: str | None = None
) -> list[subprocess.Popen[str]]:
    """Plain Optuna workers, connected and waiting for the study (each has said ``ready``)."""
    procs = [
        subprocess.Popen(
            plain_worker_cmd(url, n_trials, str(sleep_s), i, module),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        for i in range(n_workers)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return procs


def _pool_result(url: str, name: str, created: float) -> dict[str, Any]:
    trials = finished(url, name)
    last = max(t.datetime_complete for t in trials if t.datetime_complete)
    return {
        "trials": sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials),
        "best": min(t.value for t in trials if t.value is not None),
        "wall_s": _utc(last) - created,  # Optuna stores naive UTC
    }


def _utc(naive: Any) -> float:
    import datetime as dt

    return float(naive.replace(tzinfo=dt.timezone.utc).timestamp())


def plain_worker_cmd(
    url: str, n_trials: int, sleep_s: float | str, seed: int, module: str | None = None
) -> list[str]:
    """A plain Optuna worker; ``module``: one its script imports first (torch's, say)."""
    script = str(ROOT / "bench" / "plain_optuna_worker.py")
    cmd = [sys.executable, script, url, "bench", str(n_trials), str(sleep_s), str(seed)]
    return cmd + ([module] if module else [])


# --- the cost of a trial: counted statements, client and server CPU -----------------------------


def server_cpu_s() -> float | None:
    """CPU seconds used so far by every PostgreSQL process of this host; None when the
    benchmark's server is not local (its CPU cannot be read from here)."""
    if sa.engine.make_url(ADMIN_URL).host not in (None, "localhost", "127.0.0.1", "::1"):
        return None
    return postgres_cpu_s()


def postgres_cpu_s() -> float:
    """CPU seconds of the benchmark server so far: its postmaster, every process it has now
    and the ones that have exited (the postmaster's reaped children): plain Optuna's
    connections close when its workers end, before the run's CPU is read. Other servers on
    this host (a test's private one) are not counted."""
    postmaster, tick = _postmaster(), os.sysconf("SC_CLK_TCK")
    total = sum(cpu for ppid, cpu in _proc_stats().values() if ppid == postmaster)
    fields = _stat_fields(postmaster)
    return total + sum(int(f) for f in fields[11:15]) / tick  # utime stime cutime cstime


@functools.cache
def _postmaster() -> int:
    """The pid of the benchmark server's postmaster: the parent of a backend of its own."""
    admin = sa.create_engine(ADMIN_URL, poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        backend = int(conn.execute(sa.text("select pg_backend_pid()")).scalar_one())
        postmaster = int(_stat_fields(backend)[1])
    admin.dispose()
    return postmaster


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far) of every process of this host."""
    stats, tick = {}, os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = _stat_fields(int(pid))
        except OSError:  # ended meanwhile
            continue
        stats[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return stats


def _tree(roots: list[int], stats: dict[int, tuple[int, float]]) -> list[int]:
    """The live processes among ``roots`` and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [pid for pid in roots if pid in stats]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_cpu_s(roots: list[int]) -> float:
    """CPU seconds used so far by the live processes ``roots`` and all their descendants."""
    stats = _proc_stats()
    return sum(stats[pid][1] for pid in _tree(roots, stats))


def cost(
    plain: bool, history: int, m: int, sampler: str = "tpe", driver: str | None = None
) -> dict[str, float]:
    """Per-trial statements, transactions, client CPU and server CPU (ms) of one in-process
    worker running ``m`` trials of a trivial objective on a study that holds ``history``."""
    from bench.sql_counter import SqlCounter
    from hpo_framework.config.schema import load_config
    from hpo_framework.operations.coordinator import create_study
    from hpo_framework.runtime.executor import InProcessExecutor
    from hpo_framework.runtime.heartbeat import Heartbeat
    from hpo_framework.runtime.trials import open_study
    from hpo_framework.storage.backend import Backend
    from hpo_framework.storage.database import open_storage

    def measure(engine: sa.Engine, run_trials: Callable[[int], None]) -> dict[str, float]:
        run_trials(1)  # warm the caches
        counter = SqlCounter(engine)
        server, client = server_cpu_s(), time.process_time()
        with counter.counting():
            run_trials(m)
        client = time.process_time() - client
        after = server_cpu_s()
        counter.close()
        return {
            "statements": counter.statements / m,
            "transactions": counter.transactions / m,
            "client_ms": client / m * 1000,
            "server_ms": float("nan") if server is None else (after - server) / m * 1000,  # type: ignore[operator]
        }

    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        if driver is not None:
            url = sa.engine.make_url(url).set(drivername=f"postgresql+{driver}")
            url = url.render_as_string(hide_password=False)
        if plain:
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=5, grace_period=20,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
            )  # fmt: skip
            chosen = (
                optuna.samplers.TPESampler(seed=0, n_startup_trials=10)
                if sampler == "tpe"
                else optuna.samplers.RandomSampler(seed=0)
            )
            study = optuna.create_study(study_name="bench", storage=storage, sampler=chosen)
            add_history(url, "bench", history)
            states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            budget = [history]
            objective = lambda t: (t.suggest_float("x", -5.0, 5.0) - 2) ** 2  # noqa: E731

            def plain_trials(k: int) -> None:
                budget[0] += k
                callbacks = [optuna.study.MaxTrialsCallback(budget[0], states=states)]
                study.optimize(objective, n_trials=k, callbacks=callbacks)

            result = measure(storage.engine, plain_trials)
            storage.engine.dispose()
            return result
        from experiments.benchmarks import quadratic

        config = load_config(hpo_config(Path(tmp), "bench", m + 1, 0.0, sampler=sampler))
        rdb = open_storage(url, create_schema=True)
        record = create_study(rdb, config, check_session=False)
        add_history(url, "bench", history)
        handle = open_study(
            Backend(rdb), record, config, InProcessExecutor(quadratic), worker_id="b"
        )
        with Heartbeat(rdb) as heartbeat:

            def hpo_trials(k: int) -> None:
                for _ in range(k):
                    assert handle.run_one(heartbeat) is not None

            result = measure(rdb.engine, hpo_trials)
        rdb.engine.dispose()
        return result


# --- start-up, growth, connections -------------------------------------------------------------


def startup(plain: bool) -> dict[str, float]:
    """Seconds from a worker process's start to its first trial, the study already open; and
    the CPU seconds of the whole worker run (its processes: start, three trivial trials, exit)."""
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        if plain:
            optuna.create_study(study_name="bench", storage=url)
            cmd = plain_worker_cmd(url, 3, 0, 0)
        else:
            path = hpo_config(Path(tmp), "bench", 3, 0.0)
            coordinator(url, "create", str(path))
            cmd = [str(BIN / "hpo-worker"), "--idle-exit", "0.5"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.time()
        subprocess.run(cmd, env=env(url), cwd=ROOT, check=True, capture_output=True, timeout=120)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        first = min(t.datetime_start for t in finished(url, "bench") if t.datetime_start)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return {"s": _utc(first) - started, "cpu": cpu}


QUADRATIC = "experiments.benchmarks:quadratic"
#: A session whose module imports torch, and its data: what ``--preload`` is for.
TORCH_SESSION = "experiments.linear_regression:untrained_mse"
TORCH_STATIC = {"data": {"n_samples": 200, "n_features": 4, "noise": 0.1, "seed": 0}}


def startup_torch(preload: bool) -> float:
    """Seconds from a worker's start to its first result when the session's module imports
    torch: that module preloaded (``--preload``), or imported once the study is found."""
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        path = hpo_config(Path(tmp), "bench", 1, 0.0, session=TORCH_SESSION, static=TORCH_STATIC)
        coordinator(url, "create", str(path))
        cmd = [str(BIN / "hpo-worker"), "--idle-exit", "0.5"]
        if preload:
            cmd += ["--preload", TORCH_SESSION.partition(":")[0]]
        started = time.time()
        subprocess.run(cmd, env=env(url), cwd=ROOT, check=True, capture_output=True, timeout=120)
        first = min(t.datetime_complete for t in finished(url, "bench") if t.datetime_complete)
        return _utc(first) - started


def waiting_torch(preload: bool) -> float:
    """Seconds from a study's creation to its first result, the worker having waited for work
    beforehand and the session's module importing torch: preloaded while it waited, or not."""
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        path = hpo_config(Path(tmp), "bench", 1, 0.0, session=TORCH_SESSION, static=TORCH_STATIC)
        coordinator(url, "create", str(path), "--name", "warmup")  # the schema
        coordinator(url, "stop", "warmup")
        cmd = [str(BIN / "hpo-worker")]
        if preload:
            cmd += ["--preload", TORCH_SESSION.partition(":")[0]]
        log = Path(tmp) / "worker.log"
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with log.open("w") as out:
            worker = subprocess.Popen(
                cmd, env=env(url), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            _wait_for("the worker", lambda: "waiting for work" in log.read_text())
            time.sleep(3)  # a worker that has waited a while, as pools mostly do
            coordinator(url, "create", str(path))
            _wait_for("a result", lambda: bool(finished(url, "bench")), timeout=120)
            with engine.connect() as conn:
                created = conn.execute(
                    sa.text("select created_at from hpo_studies where study_name = 'bench'")
                ).scalar_one()
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=120)
            engine.dispose()
        first = min(t.datetime_complete for t in finished(url, "bench") if t.datetime_complete)
        return _utc(first) - created


def pss_mb(roots: list[int]) -> float:
    """Proportional set size of ``roots`` and their descendants, MB: memory shared between
    them (a fork server's imports) counted once in all."""
    total = 0
    for pid in _tree(roots, _proc_stats()):
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += int(re.search(r"^Pss:\s+(\d+) kB", rollup, re.M).group(1))  # type: ignore[union-attr]
    return total / 1024


def pool_run(mode: str, n_workers: int, torch: bool) -> dict[str, float]:
    """A host's pool of ``n_workers``, each running two trials, the study there before the pool
    starts: seconds to the last result, and the CPU and memory (PSS) of all its processes then.
    ``torch``: the session's module imports torch (and is preloaded), else a trivial session.
    ``mode``: ``fork`` (hpo: executors forked from the pool's fork server, the module imported
    there once), ``fresh`` (hpo with ``HPO_FORKSERVER=0``: each executor imports it) or
    ``plain`` (plain Optuna processes, whose script imports torch where the session does)."""
    n_trials = 2 * n_workers
    module = TORCH_SESSION.partition(":")[0] if torch else None
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        if mode == "plain":
            optuna.create_study(study_name="bench", storage=url)
            started = time.time()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            procs = start_plain_workers(url, n_workers, n_trials, 0.0, module)
            memory = pss_mb([p.pid for p in procs])  # each has imported what it needs
            for p in procs:
                p.wait(timeout=300)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        else:
            session = (TORCH_SESSION, TORCH_STATIC) if torch else (QUADRATIC, {})
            path = hpo_config(
                Path(tmp), "bench", n_trials, 0.0, session=session[0], static=session[1]
            )
            coordinator(url, "create", str(path))
            cmd = [str(BIN / "hpo-worker"), "--processes", str(n_workers)]
            started = time.time()
            pool = subprocess.Popen(
                cmd + (["--preload", module] if module else []), cwd=ROOT,
                env={**env(url), "HPO_FORKSERVER": "1" if mode == "fork" else "0"},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                _wait_for("the study", lambda: len(finished(url, "bench")) >= n_trials, 300)
                cpu, memory = tree_cpu_s([pool.pid]), pss_mb([pool.pid])
            finally:
                pool.send_signal(signal.SIGTERM)
                pool.wait(timeout=120)
        last = max(t.datetime_complete for t in finished(url, "bench") if t.datetime_complete)
        return {"s": _utc(last) - started, "cpu": cpu, "pss": memory}


def inspect_cpu(history: int) -> dict[str, float]:
    """CPU seconds of reading a study of ``history`` finished trials from a fresh process (the
    median of five runs), each command in the same database: ``hpo-inspect STUDY`` (its
    summary table), ``--trial N``, ``--workers``, and plain Optuna's ``optuna best-trial``."""
    commands = {
        "table": [str(BIN / "hpo-inspect"), "bench"],
        "trial": [str(BIN / "hpo-inspect"), "bench", "--trial", str(history // 2)],
        "workers": [str(BIN / "hpo-inspect"), "--workers"],
        "plain": [str(BIN / "optuna"), "best-trial", "--study-name", "bench", "--storage"],
    }
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        coordinator(url, "create", str(hpo_config(Path(tmp), "bench", history + 10, 0.0)))
        add_history(url, "bench", history)
        runs: dict[str, list[float]] = {key: [] for key in commands}
        for _ in range(5):  # a few seconds each: the median of five, alternating
            for key, cmd in commands.items():
                cmd = [*cmd, url] if key == "plain" else cmd
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                subprocess.run(cmd, env=env(url), cwd=ROOT, check=True, capture_output=True)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                runs[key].append(
                    after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                )
        return {key: statistics.median(values) for key, values in runs.items()}


def executor_hop(calls: int) -> dict[str, float]:
    """Milliseconds per session call through the executor process and in-process, and seconds
    from starting an executor to the session imported there (beside the worker's own start)."""
    from experiments.benchmarks import quadratic
    from hpo_framework.runtime.executor import InProcessExecutor, ProcessExecutor

    class NoLink:
        info: dict[str, object] = {}

        def report(self, value: float, step: int) -> None:
            pass

        def set_attr(self, key: str, value: object) -> None:
            pass

        def log(self, step: int | None, metrics: object) -> None:
            pass

        def suggest(self, kind: str, name: str, kwargs: object) -> None:
            pass

        def constrain(self, key: str, value: float) -> None:
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
    config = {"session": session, "space": space, "seed": seed}
    return float(run_hpo_pool(workers, n, 0.02, config)["best"])


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


def floor(sleep_s: float, ideal_s: float, per_trial_s: float, cpu_s: float) -> float:
    """The least time / ideal the measured costs allow: each worker's trials one after another
    (``sleep_s`` plus one worker's own per-trial time, measured alone), or the CPU the whole
    run used (every worker and executor process, and the PostgreSQL server) spread over this
    host's cores, whichever is longer. Start-up is outside both, as it is outside the clock."""
    cores = os.cpu_count() or 1
    return max((sleep_s + per_trial_s) / sleep_s, cpu_s / (cores * ideal_s))


def _run_cpu(result: dict[str, Any]) -> float:
    server = result["server_cpu_s"]
    return float(result["client_cpu_s"] + (0.0 if server != server else server))  # nan: remote


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument(
        "--only", metavar="ROWS",
        help="measure only these rows and print them, writing no file (comma-separated: cost, "
        "driver, overhead, scaling, startup, preload, forkserver, executor, growth, inspect, "
        "connections, "
        "quality)",
    )  # fmt: skip
    args = parser.parse_args()
    q = args.quick
    chosen = None if args.only is None else set(args.only.split(","))

    def want(name: str) -> bool:
        return chosen is None or name in chosen

    repeats = 1 if q else args.repeats
    lines: list[str] = []

    def row(name: str, measure: str, a: Any, b: Any, ratio: str = "") -> None:
        lines.append(f"| {name} | {measure} | {a} | {b} | {ratio} |")
        print(lines[-1], flush=True)

    # The cost of a trial: one in-process worker, TPE, a study growing to 100 trials.
    if want("cost"):
        m = 10 if q else 100
        a, b = paired(repeats, lambda: cost(False, 0, m), lambda: cost(True, 0, m))
        for key, measure, fmt in (
            ("statements", "SQL statements per trial (counted)", "{:.1f}"),
            ("transactions", "transactions per trial (counted)", "{:.1f}"),
            ("client_ms", "client CPU per trial, ms", "{:.1f}"),
            ("server_ms", "PostgreSQL server CPU per trial, ms", "{:.1f}"),
        ):
            va, vb = median(a, key), median(b, key)
            row("cost", f"{measure}, 1 worker, TPE, {m} trials", fmt.format(va), fmt.format(vb),
                f"{va / vb:.2f}x" if vb else "")  # fmt: skip

    # The driver: psycopg 3 against psycopg2 (the default), the same trials through hpo.
    if want("driver"):
        a, b = paired(
            repeats, lambda: cost(False, 0, m, driver="psycopg"), lambda: cost(False, 0, m, "tpe")
        )
        va, vb = median(a, "client_ms"), median(b, "client_ms")
        row("driver", f"hpo's client CPU per trial, ms, with psycopg 3 (hpo column) and psycopg2 "
            f"(default; Optuna column), 1 worker, TPE, {m} trials", f"{va:.1f}", f"{vb:.1f}",
            f"{va / vb:.2f}x")  # fmt: skip

    # Overhead: one worker, trivial objective, per-trial wall time (both waiting, same clock).
    if want("overhead") or want("scaling"):
        n = 20 if q else 200
        a, b = paired(repeats, lambda: run_hpo_pool(1, n, 0.0), lambda: run_plain_pool(1, n, 0.0))
        per_a, per_b = median(a, "wall_s") / n, median(b, "wall_s") / n
        row("overhead", f"ms per trial, 1 worker, {n} trials of a trivial objective (TPE)",
            f"{per_a * 1000:.1f}", f"{per_b * 1000:.1f}", f"{per_a / per_b:.2f}x")  # fmt: skip

    # Scaling curve: time / ideal from the study's creation to its last trial.
    if want("scaling"):
        curve = ((1, 2), (0.2,), 3) if q else ((1, 4, 8, 16, 32), (0.5, 2.0), None)
        worker_counts, sleeps, fixed_k = curve
        curve_lines, extra_a, extra_b = [], 0, 0
        for s in sleeps:
            k = fixed_k or (10 if s < 1 else 4)  # trials per worker: an ideal of 5 s and 8 s
            for w in worker_counts:
                runs = repeats if (w, s) == (16, 0.5) else 1
                ra, rb = paired(
                    runs,
                    lambda w=w, k=k, s=s: run_hpo_pool(w, w * k, s),  # type: ignore[misc]
                    lambda w=w, k=k, s=s: run_plain_pool(w, w * k, s),  # type: ignore[misc]
                )
                ideal = k * s
                extra_a = max([extra_a] + [r["trials"] - w * k for r in ra])
                extra_b = max([extra_b] + [r["trials"] - w * k for r in rb])
                cpu_a = statistics.median(_run_cpu(r) for r in ra)
                cpu_b = statistics.median(_run_cpu(r) for r in rb)
                curve_lines.append(
                    f"| {w} | {s} | {w * k} | {median(ra, 'wall_s') / ideal:.3f} | "
                    f"{median(rb, 'wall_s') / ideal:.3f} | {floor(s, ideal, per_a, cpu_a):.3f} | "
                    f"{cpu_a / (w * k) * 1000:.1f} | {cpu_b / (w * k) * 1000:.1f} |"
                )
                print(curve_lines[-1], flush=True)
        row("budget", "trials finished beyond n_trials, any point of the curve", extra_a, extra_b)

    # Start-up: worker process start to its first trial.
    if want("startup"):
        a, b = paired(repeats, lambda: startup(False), lambda: startup(True))
        row("start-up", "seconds from worker process start to its first trial",
            f"{median(a, 's'):.2f}", f"{median(b, 's'):.2f}",
            f"{median(a, 's') / median(b, 's'):.2f}x")  # fmt: skip
        row("start-up", "CPU seconds of a worker's whole run: start, 3 trivial trials, exit "
            "(hpo: every process of the worker)", f"{median(a, 'cpu'):.2f}",
            f"{median(b, 'cpu'):.2f}", f"{median(a, 'cpu') / median(b, 'cpu'):.2f}x")  # fmt: skip

    # A session whose module imports torch: preloaded while the worker starts, or not.
    if want("preload"):
        a, b = paired(
            repeats, lambda: {"s": startup_torch(True)}, lambda: {"s": startup_torch(False)}
        )
        row("preload", "seconds from worker start to its first result, the session's module "
            "importing torch: with --preload of it (hpo column) and without (Optuna column)",
            f"{median(a, 's'):.2f}", f"{median(b, 's'):.2f}",
            f"{median(a, 's') / median(b, 's'):.2f}x")  # fmt: skip
        a, b = paired(
            repeats, lambda: {"s": waiting_torch(True)}, lambda: {"s": waiting_torch(False)}
        )
        row("preload", "seconds from a study's creation to its first result, the worker waiting "
            "beforehand, the same session: with --preload (hpo column) and without (Optuna "
            "column)", f"{median(a, 's'):.2f}", f"{median(b, 's'):.2f}",
            f"{median(a, 's') / median(b, 's'):.2f}x")  # fmt: skip

    # A pool on one host: one import per host (the fork server) or one per worker.
    if want("forkserver"):
        w = 2 if q else 4
        for torch in (False, True):
            fork, fresh, plain = ([pool_run(mode, w, torch) for _ in range(repeats)]
                                  for mode in ("fork", "fresh", "plain"))  # fmt: skip
            what = "whose session module imports torch" if torch else "of a trivial session"
            for key, measure in (
                ("cpu", "CPU seconds of all its processes"), ("pss", "memory (PSS), MB"),
                ("s", "seconds from its start to the last result"),
            ):  # fmt: skip
                if key != "cpu" and not torch:
                    continue
                a, b, c = median(fork, key), median(fresh, key), median(plain, key)
                text = (f"a pool of {w} workers {what}, {2 * w} trials: {measure}; hpo (hpo "
                        f"column), plain Optuna processes (Optuna column), hpo with "
                        f"HPO_FORKSERVER=0: {b:.1f}")  # fmt: skip
                row("fork server", text, f"{a:.1f}", f"{c:.1f}", f"{a / c:.2f}x")

    # The executor process (sessions run outside the worker): its cost per call and at start.
    if want("executor"):
        hops = [executor_hop(50 if q else 500) for _ in range(repeats)]
        row("executor hop", "ms per session call through the executor process (hpo) vs a call in "
            "the same process", f"{median(hops, 'process'):.3f}",
            f"{median(hops, 'inline'):.3f}")  # fmt: skip
        row("executor start", "seconds from starting the executor to the session imported "
            "there (runs beside the worker's own start)", f"{median(hops, 'start_s'):.2f}",
            "-")  # fmt: skip

    # Growth: per-trial client CPU with 5,000 finished trials in the study vs 100.
    if want("growth"):
        big, m = (300, 5) if q else (5000, 60)
        for sampler in ("random", "tpe"):  # a few ms per trial: medians of the repeats
            ga = [statistics.median(cost(False, h, m, sampler)["client_ms"]
                                    for _ in range(repeats)) for h in (100, big)]  # fmt: skip
            gb = [statistics.median(cost(True, h, m, sampler)["client_ms"]
                                    for _ in range(repeats)) for h in (100, big)]  # fmt: skip
            row("growth", f"client CPU per trial at {big} finished trials ({sampler}): ms, and "
                "the ratio to 100 finished trials", f"{ga[1]:.1f} ({ga[1] / ga[0]:.2f})",
                f"{gb[1]:.1f} ({gb[1] / gb[0]:.2f})", f"{ga[1] / gb[1]:.2f}x")  # fmt: skip

    # Reading results: a large study, from a fresh process.
    if want("inspect"):
        big = 300 if q else 5000
        reads = [inspect_cpu(big) for _ in range(repeats)]
        row("inspect", f"CPU seconds to show the best trial of a {big}-trial study from a fresh "
            "process (`hpo-inspect STUDY`; `optuna best-trial`)", f"{median(reads, 'table'):.2f}",
            f"{median(reads, 'plain'):.2f}",
            f"{median(reads, 'table') / median(reads, 'plain'):.2f}x")  # fmt: skip
        row("inspect", f"CPU seconds of `hpo-inspect STUDY --trial N` and of `hpo-inspect "
            f"--workers` on the same {big}-trial study", f"{median(reads, 'trial'):.2f} / "
            f"{median(reads, 'workers'):.2f}", "-")  # fmt: skip

    # Connections: 64 workers against the server's max_connections (plain Optuna only in full
    # runs: it exhausts the server, which would disturb anything else using it).
    if want("connections"):
        n_workers = 8 if q else 64
        ca = connections(False, n_workers, n_workers * 2)
        cb = {"peak": "-", "errors": "-"} if q else connections(True, n_workers, n_workers * 2)
        row("connections", f"{n_workers} workers: peak server connections / workers failed "
            f"(max_connections = {max_connections()})", f"{ca['peak']} / {ca['errors']}",
            f"{cb['peak']} / {cb['errors']}")  # fmt: skip

    # Search quality: best after N trials, 8 workers vs 1, several seeds (median [min, max]).
    if want("quality"):
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

    if chosen is not None:
        return
    table = "\n".join(
        ["| row | measure | hpo | plain Optuna | hpo / Optuna |", "|---|---|---|---|---|", *lines]
    )
    table += (
        "\n\nScaling: time from the study's creation to its last trial, over the ideal "
        "(trials x seconds / workers), with both sides' workers started and waiting. The floor "
        "is the least the measured costs allow on this host: one worker's per-trial time, or "
        "all the CPU the run used (worker and executor processes and the PostgreSQL server) "
        "over the cores (bench/run.py, `floor`); CPU per trial is that CPU over the trials.\n\n"
        "| workers | trial s | trials | hpo | plain Optuna | floor (hpo) | hpo CPU ms/trial "
        "| Optuna CPU ms/trial |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(curve_lines)
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
            f"in docs/PERFORMANCE.md.\n\n{header}\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
