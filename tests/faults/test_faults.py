"""The pool's guarantees under the faults a network, a failover and a paused host inject.

Workers reach PostgreSQL through ``FaultProxy``, which loses the server's answers to chosen
statements (the server committed, the worker never heard), cuts every connection for a while
and holds answers as a stopped process would. Each test is one of the faults of issue 12; all
check the same promises: the exact budget, no point run twice, nothing left running.
"""

from __future__ import annotations

import collections
import json
import pickle
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from hpo_framework.exceptions import StorageError
from hpo_framework.storage.database import open_storage, with_db_retry
from tests.conftest import ROOT, run_cli, start_worker
from tests.fault_proxy import FaultProxy
from tests.pool_helpers import counts, create, kill_a_worker_mid_trial, trials, wait_until


@pytest.fixture
def proxy(pg_url: str) -> Iterator[tuple[FaultProxy, str]]:
    """A fault proxy in front of this test's database, and the URL that goes through it."""
    url = sa.engine.make_url(pg_url)
    fault = FaultProxy(url.port or 5432, url.host or "127.0.0.1")
    yield fault, fault.url(url.database or "postgres", url.username or "postgres")
    fault.close()


def _scalar(url: str, sql: str) -> Any:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql)).scalar()
    finally:
        engine.dispose()


def _assert_exact(url: str, name: str, n_trials: int) -> collections.Counter[str]:
    """The books balance: n_trials finished, every failure re-queued at most once, no ticket
    left, the budget counter equal to what was spent."""
    result = trials(url, name)
    c = collections.Counter(t.state.name for t in result)
    assert c["COMPLETE"] + c["PRUNED"] == n_trials, c
    assert c["RUNNING"] == 0 and c["WAITING"] == 0, c
    requeued = collections.Counter(
        t.system_attrs["hpo:requeued_from"]
        for t in result
        if "hpo:requeued_from" in t.system_attrs
    )
    assert all(n == 1 for n in requeued.values()), requeued
    assert _scalar(url, "select count(*) from hpo_tickets") == 0
    assert _scalar(url, "select claimed from hpo_studies") == n_trials
    return c


def test_lost_answers_change_neither_the_budget_nor_the_queue(
    pg_url: str, proxy: tuple[FaultProxy, str], tmp_path: Path
) -> None:
    """Every step that moves the budget or the queue, with its answer lost after the server
    committed it: the worker's retry must find its own work done, not do it again."""
    fault, url = proxy
    fault.lose_commit_after("INSERT INTO hpo_tickets", times=3)  # claims
    fault.lose_commit_after("DELETE FROM hpo_tickets", times=3)  # settlements
    fault.lose_commit_after("INSERT INTO trial_system_attributes", "hpo:requeued_from", times=2)
    fault.lose_commit_after("UPDATE trials SET state", "WAITING", times=2)  # pops of retries
    fault.lose_commit_after("INSERT INTO trial_values", times=2)  # results
    name = create(
        tmp_path, pg_url, session="tests.sessions:fail_first_attempt",
        static={"dir": str(tmp_path)},
        study_={"n_trials": 12, "max_retries": 3, "max_failed_trials": None,
                "sampler": {"name": "random", "seed": 3}},
    )  # fmt: skip
    log = tmp_path / "w.log"
    worker = start_worker("--idle-exit", "3", url=url, log=log)
    assert worker.wait(timeout=240) == 0, log.read_text()[-3000:]
    assert fault.pending() == 0 and fault.lost_answers == 12, fault.report()
    c = _assert_exact(pg_url, name, 12)
    assert c["FAIL"] == 12  # each point failed once, then its one retry completed
    assert _scalar(pg_url, "select failures from hpo_studies") == 12
    assert " ERROR " not in log.read_text()


def test_a_short_outage_loses_no_running_trial(
    pg_url: str, proxy: tuple[FaultProxy, str], tmp_path: Path
) -> None:
    """The database is cut off for longer than the grace period while trials run: when it is
    back, nobody fails the others' trials for a silence that was the database's."""
    fault, url = proxy
    name = create(
        tmp_path, pg_url, session="tests.sessions:sleepy",
        static={"sleep_s": 4.0, "dir": str(tmp_path)},
        study_={"n_trials": 4, "heartbeat_interval": 1, "grace_period": 3},
    )  # fmt: skip
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    workers = [start_worker("--idle-exit", "4", url=url, log=log) for log in logs]
    wait_until("both workers to run a trial", lambda: len(list(tmp_path.glob("started-*"))) >= 2)
    fault.outage(5.0)
    for w in workers:
        assert w.wait(timeout=180) == 0
    c = _assert_exact(pg_url, name, 4)
    assert c["FAIL"] == 0, [t.user_attrs.get("error") for t in trials(pg_url, name)]
    text = "".join(log.read_text() for log in logs)
    assert "database unavailable" in text and "lost" not in text


def test_a_frozen_worker_holding_a_lock_stalls_nobody_else(
    pg_url: str, proxy: tuple[FaultProxy, str], tmp_path: Path
) -> None:
    """A worker stops for good right after taking the study's row lock (Optuna locks it to
    number a new trial): the server ends its transaction and the others carry on."""
    fault, url = proxy
    fault.freeze_after("FROM studies", "FOR UPDATE", seconds=300)
    name = create(
        tmp_path, pg_url, static={"sleep_s": 0.05}, session="tests.sessions:sleepy",
        study_={"n_trials": 10},
    )  # fmt: skip
    frozen = start_worker(url=url, log=tmp_path / "frozen.log")
    wait_until("the frozen worker to take the lock", lambda: fault.frozen_answers == 1)
    others = start_worker("--processes", "2", url=pg_url, log=tmp_path / "others.log")
    # All but the frozen worker's own trial finish while it still holds its ticket.
    wait_until("the others to run 9 trials", lambda: counts(pg_url, name)["COMPLETE"] >= 9, 90)
    assert frozen.poll() is None and others.poll() is None


@pytest.mark.parametrize("zones", [("Pacific/Kiritimati", "America/Adak")])
def test_time_zones_change_no_judgement(
    pg_url: str, pg_admin: sa.Engine, tmp_path: Path, zones: tuple[str, str]
) -> None:
    """Workers 24 hours apart by PGTZ, on a database whose server zone has DST: live trials
    are left alone, and a dead worker's trial is recovered within its grace period."""
    database = sa.engine.make_url(pg_url).database
    with pg_admin.connect() as conn:
        conn.execute(sa.text(f"ALTER DATABASE \"{database}\" SET timezone = 'Europe/Berlin'"))
    name = create(
        tmp_path, pg_url, session="tests.sessions:sleepy",
        static={"sleep_s": 4.0, "dir": str(tmp_path)},
        study_={"n_trials": 6, "heartbeat_interval": 1, "grace_period": 3},
    )  # fmt: skip
    east = start_worker("--idle-exit", "4", url=pg_url, log=tmp_path / "e.log", PGTZ=zones[0])
    victim = start_worker(url=pg_url, log=tmp_path / "v.log", PGTZ=zones[1])
    wait_until("both workers to run a trial", lambda: len(list(tmp_path.glob("started-*"))) >= 2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert east.wait(timeout=180) == 0
    c = _assert_exact(pg_url, name, 6)
    errors = [t.user_attrs.get("error") for t in trials(pg_url, name) if t.state.name == "FAIL"]
    assert c["FAIL"] == 1 and "lost: no heartbeat for over 3s" in str(errors), errors


def test_a_worker_with_a_skewed_clock_loses_nothing(pg_url: str, tmp_path: Path) -> None:
    """Host clocks ten minutes fast and ten minutes slow: only the database's clock counts."""
    name = create(
        tmp_path, pg_url, static={"sleep_s": 0.3}, session="tests.sessions:sleepy",
        study_={"n_trials": 16, "heartbeat_interval": 1, "grace_period": 3},
    )  # fmt: skip
    skewed = {"PYTHONPATH": str(ROOT / "tests" / "skewed_clock")}
    logs = [tmp_path / "fast.log", tmp_path / "slow.log"]
    workers = [
        start_worker("--idle-exit", "3", url=pg_url, log=logs[0], **skewed, HPO_TEST_SKEW_S="600"),
        start_worker(
            "--idle-exit", "3", url=pg_url, log=logs[1], **skewed, HPO_TEST_SKEW_S="-600"
        ),
    ]
    for w in workers:
        assert w.wait(timeout=180) == 0
    c = _assert_exact(pg_url, name, 16)
    assert c["FAIL"] == 0
    assert "clock skewed by" in logs[0].read_text()  # the skew really was in effect


def test_only_connection_failures_are_retried(pg_url: str) -> None:
    """A refusal ("value too long") fails at once with the database's reason; a dropped
    connection is waited out."""
    storage = open_storage(pg_url, create_schema=True)
    engine = storage.engine
    tries = []

    def too_long() -> None:
        tries.append(1)
        with engine.begin() as conn:
            conn.execute(sa.text("insert into studies (study_name) values (:n)"), {"n": "x" * 600})

    with pytest.raises(StorageError, match="database refused saving: .*too long"):
        with_db_retry(too_long, "saving")
    assert len(tries) == 1

    def dropped_once() -> int:
        tries.append(1)
        with engine.connect() as conn:
            if len(tries) == 2:
                conn.execute(sa.text("select pg_terminate_backend(pg_backend_pid())"))
            return int(conn.execute(sa.text("select 7")).scalar_one())

    assert with_db_retry(dropped_once, "reading") == 7 and len(tries) == 3
    engine.dispose()


def test_a_stopped_studys_lost_trial_is_recovered(pg_url: str, tmp_path: Path) -> None:
    name = kill_a_worker_mid_trial(tmp_path, pg_url, sleep_s=60.0, n_trials=2)
    assert run_cli("hpo-coordinator", "stop", name, url=pg_url).returncode == 0
    rescuer = start_worker("--idle-exit", "2", url=pg_url, log=tmp_path / "r.log")
    assert rescuer.wait(timeout=120) == 0
    c = counts(pg_url, name)
    assert c["RUNNING"] == 0 and c["FAIL"] == 1, c
    assert _scalar(pg_url, "select count(*) from hpo_tickets") == 0
    assert _scalar(pg_url, "select claimed from hpo_studies") == 0


def test_a_pickle_in_the_database_never_runs_in_a_worker(pg_url: str, tmp_path: Path) -> None:
    """A database writer switches a study to cmaes and plants a pickle where CmaEsSampler
    reads its state: workers refuse the sampler instead of unpickling it."""
    space = {"x": {"type": "float", "low": -5.0, "high": 5.0},
             "y": {"type": "float", "low": -5.0, "high": 5.0}}  # fmt: skip
    name = create(tmp_path, pg_url, study_={"n_trials": 3}, search_space=space)
    marker = tmp_path / "pwned"
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        raw = json.loads(conn.execute(sa.text("select config_json from hpo_studies")).scalar_one())
        raw["study"]["sampler"] = {"name": "cmaes"}
        conn.execute(sa.text("update hpo_studies set config_json = :c"), {"c": json.dumps(raw)})
        payload = pickle.dumps(_Planted(str(marker))).hex()
        trial_id = conn.execute(
            sa.text(
                "insert into trials (number, study_id, state, datetime_start, datetime_complete)"
                " select 0, study_id, 'COMPLETE', now(), now() from studies returning trial_id"
            )
        ).scalar_one()
        conn.execute(
            sa.text("insert into trial_system_attributes (trial_id, key, value_json) "
                    "values (:t, 'cma:optimizer:0', :v)"),
            {"t": trial_id, "v": json.dumps(payload)},
        )  # fmt: skip
    engine.dispose()
    log = tmp_path / "w.log"
    worker = start_worker("--idle-exit", "3", url=pg_url, log=log, HPO_UNSAFE_ALLOW_PICKLE="")
    assert worker.wait(timeout=120) == 0
    assert not marker.exists()
    assert "HPO_UNSAFE_ALLOW_PICKLE=1" in log.read_text()
    assert counts(pg_url, name)["COMPLETE"] == 1  # only the planted row


class _Planted:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_sharing_the_database_with_optunas_own_tools(pg_url: str, tmp_path: Path) -> None:
    """`optuna delete-study` under a running pool, and a trial made with `optuna ask`."""
    doomed = create(tmp_path, pg_url, "doomed", static={"sleep_s": 0.2},
                    session="tests.sessions:sleepy", study_={"n_trials": 1000})  # fmt: skip
    kept = create(tmp_path, pg_url, "kept", static={"sleep_s": 0.2},
                  session="tests.sessions:sleepy", study_={"n_trials": 30})  # fmt: skip
    optuna_cli = str(Path(ROOT / ".venv" / "bin" / "optuna"))
    log = tmp_path / "w.log"
    worker = start_worker("--idle-exit", "3", url=pg_url, log=log)
    wait_until("trials of both", lambda: counts(pg_url, doomed)["COMPLETE"] >= 2
               and counts(pg_url, kept)["COMPLETE"] >= 2)  # fmt: skip
    asked = subprocess.run(
        [optuna_cli, "ask", "--storage", pg_url, "--study-name", kept],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    for _ in range(10):
        # Optuna's delete-study exits 0 having deleted nothing when a trial was added while
        # it ran (it ignores the integrity error and rolls back); a user runs it again.
        deleted = subprocess.run(
            [optuna_cli, "delete-study", "--storage", pg_url, "--study-name", doomed],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert deleted.returncode == 0, deleted.stderr
        if _scalar(pg_url, f"select count(*) from studies where study_name = '{doomed}'") == 0:
            break
    assert worker.wait(timeout=180) == 0
    text = log.read_text()
    assert f"study {doomed!r} was deleted" in text and "Traceback" not in text
    c = counts(pg_url, kept)
    assert c["COMPLETE"] == 30 and c["RUNNING"] == 1  # the asked trial is not hpo's to judge
    listed = run_cli("hpo-coordinator", "list", url=pg_url)
    assert listed.returncode == 0 and kept in listed.stdout and doomed not in listed.stdout
    gone = run_cli("hpo-inspect", doomed, url=pg_url)
    assert gone.returncode != 0 and gone.stderr.count("\n") == 1 and "Traceback" not in gone.stderr
