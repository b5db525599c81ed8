"""Helpers of the worker-pool tests: create studies, wait on the database, count trials."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa

from tests.conftest import make_config, run_cli, start_worker, write_config


def create(tmp_path: Path, url: str, name: str = "pool", **overrides: Any) -> str:
    config = make_config(**overrides)
    config["study"]["name"] = name
    path = write_config(tmp_path / f"{abs(hash(name))}.yaml", config)  # names may hold "/"
    result = run_cli("hpo-coordinator", "create", str(path), url=url)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1]


def create_sleepy(tmp_path: Path, url: str, sleep_s: float, n_trials: int) -> str:
    """A study of ``tests.sessions:sleepy``; each trial leaves a ``started-*`` file in
    ``tmp_path`` as it starts (see :func:`wait_for_a_trial`)."""
    static = {"sleep_s": sleep_s, "dir": str(tmp_path)}
    study = {"n_trials": n_trials}
    return create(tmp_path, url, session="tests.sessions:sleepy", static=static, study_=study)


def wait_for_a_trial(tmp_path: Path) -> None:
    wait_until("a trial to start", lambda: any(tmp_path.glob("started-*")))


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def counts(url: str, name: str) -> Counter[str]:
    return Counter(t.state.name for t in trials(url, name))


def wait_until(
    what: str, check: Callable[[], bool], timeout: float = 60, every: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kill_a_worker_mid_trial(tmp_path: Path, url: str, sleep_s: float, n_trials: int) -> str:
    """Create a study of ``sleepy`` trials (heartbeat 1 s, grace 3 s), start a worker and
    ``kill -9`` it once its first trial runs; returns the study's name."""
    name = create(
        tmp_path, url, session="tests.sessions:sleepy",
        static={"sleep_s": sleep_s, "dir": str(tmp_path)},
        study_={"n_trials": n_trials, "heartbeat_interval": 1, "grace_period": 3},
    )  # fmt: skip
    victim = start_worker(url=url)
    wait_until("a trial to start", lambda: any(tmp_path.glob("started-*")))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    return name


def peak_connections(pool: Any, admin: sa.Engine, database: str) -> int:
    """Wait for the worker ``pool`` to exit; the most connections to ``database`` seen."""
    peak = 0
    query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d")
    while pool.poll() is None:
        with admin.connect() as conn:  # to another database: not counted
            peak = max(peak, int(conn.execute(query, {"d": database}).scalar_one()))
        time.sleep(0.05)
    return peak
