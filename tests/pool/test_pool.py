"""The worker pool's guarantees, each against a real PostgreSQL with real worker processes."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa

from hpo_framework.runtime.heartbeat import Heartbeat
from hpo_framework.runtime.settle import Ledger, requeue_once
from hpo_framework.storage.backend import Backend
from hpo_framework.storage.database import open_storage, without_waiting
from hpo_framework.storage.registry import PG_NOW_SQL, Registry
from hpo_framework.storage.tickets import Tickets
from hpo_framework.storage.trial_attrs import REQUEUED_FROM_ATTR
from tests.checkpoint_stores import Store
from tests.conftest import free_port, run_cli, start_worker
from tests.pool_helpers import (
    counts,
    create,
    create_sleepy,
    kill_a_worker_mid_trial,
    peak_connections,
    trials,
    wait_for_a_trial,
    wait_until,
)


def test_workers_wait_for_the_schema_then_run_the_exact_budget(
    pg_driver_url: str, tmp_path: Path
) -> None:
    # Workers start on an empty database: none may create tables (Optuna #1092); they wait.
    log = tmp_path / "workers.log"
    pool = start_worker("--processes", "8", "--idle-exit", "3", url=pg_driver_url, log=log)
    wait_until("workers to announce waiting", lambda: log.read_text().count("waiting for") >= 8)
    name = create(tmp_path, pg_driver_url, static={"sleep_s": 0.05}, study_={"n_trials": 40})
    assert pool.wait(timeout=120) == 0
    c = counts(pg_driver_url, name)
    assert c["COMPLETE"] == 40 and c["RUNNING"] == 0 and c["WAITING"] == 0 and c["FAIL"] == 0
    text = log.read_text()
    assert "alembic" not in text.lower() and "Traceback" not in text
    result = trials(pg_driver_url, name)
    assert len({t.user_attrs["worker"] for t in result}) > 1
    assert sorted(t.number for t in result) == list(range(40))  # numbered as Optuna numbers


def test_a_killed_worker_loses_no_trial(pg_driver_url: str, tmp_path: Path) -> None:
    name = kill_a_worker_mid_trial(tmp_path, pg_driver_url, sleep_s=2.0, n_trials=3)
    rescuer = start_worker("--idle-exit", "5", url=pg_driver_url, log=tmp_path / "rescuer.log")
    assert rescuer.wait(timeout=120) == 0
    result = trials(pg_driver_url, name)
    failed = [t for t in result if t.state.name == "FAIL"]
    assert len(failed) == 1
    assert (
        f"worker {failed[0].user_attrs['worker']} lost: no heartbeat for over 3s"
        == failed[0].user_attrs["error"]
    )
    retries = [t for t in result if t.user_attrs.get("retry_of") == failed[0].number]
    assert [t.params for t in retries] == [failed[0].params]
    assert retries[0].state.name == "COMPLETE"
    c = counts(pg_driver_url, name)
    assert c["COMPLETE"] == 3 and c["RUNNING"] == 0 and c["WAITING"] == 0
    assert "params re-queued" in (tmp_path / "rescuer.log").read_text()


def test_first_sigterm_finishes_the_trial_and_exits_0(pg_url: str, tmp_path: Path) -> None:
    name = create_sleepy(tmp_path, pg_url, 1.5, 5)
    worker = start_worker(url=pg_url, log=tmp_path / "w.log")
    wait_for_a_trial(tmp_path)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    c = counts(pg_url, name)
    assert c == {"COMPLETE": 1}  # the running trial finished, no new one was taken


def test_second_sigterm_fails_the_trial_requeues_it_and_exits_at_once(
    pg_url: str, tmp_path: Path
) -> None:
    name = create_sleepy(tmp_path, pg_url, 30, 1)
    worker = start_worker(url=pg_url, log=tmp_path / "w.log")
    wait_for_a_trial(tmp_path)
    started = _stop_twice(worker, tmp_path / "w.log")
    assert worker.wait(timeout=10) == 1
    assert time.monotonic() - started < 5
    result = trials(pg_url, name)
    assert [t.state.name for t in result] == ["FAIL", "WAITING"]
    assert result[0].user_attrs["error"] == "worker stopped by a second signal"
    assert result[1].params == {} and result[1].system_attrs["fixed_params"] == result[0].params


def _stop_twice(worker: subprocess.Popen[str], log: Path) -> float:
    """A warm stop, then (once the worker has taken it) a cold one; when the second was sent."""
    worker.send_signal(signal.SIGTERM)
    wait_until("the first signal taken", lambda: "received, finishing" in log.read_text())
    sent = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    return sent


def test_second_sigterm_exits_at_once_with_the_database_gone(private_pg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = private_pg.url
    create_sleepy(tmp_path, url, 60, 1)
    worker = start_worker(url=url, log=tmp_path / "w.log")
    wait_for_a_trial(tmp_path)
    private_pg.stop()  # the trial's failure cannot be recorded: another worker's sweep will
    started = _stop_twice(worker, tmp_path / "w.log")
    assert worker.wait(timeout=30) == 1, (tmp_path / "w.log").read_text()
    assert time.monotonic() - started < 8, (tmp_path / "w.log").read_text()


def test_first_sigterm_with_the_database_gone_exits_within_the_stop_wait(
    private_pg,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    url = private_pg.url
    name = create(
        tmp_path, url, session="tests.sessions:sleepy",
        static={"sleep_s": 4, "dir": str(tmp_path)}, study_={"n_trials": 2},
    )  # fmt: skip
    log = tmp_path / "w.log"
    worker = start_worker(url=url, log=log, HPO_STOP_DB_WAIT="5")
    wait_for_a_trial(tmp_path)
    private_pg.stop()  # gone while the trial runs: its result cannot be saved
    sent = time.monotonic()
    worker.send_signal(signal.SIGTERM)  # once: finish the trial, then go
    assert worker.wait(timeout=60) == 1, log.read_text()
    took = time.monotonic() - sent
    assert took < 4 + 5 + 10, log.read_text()  # the trial, the stop wait, and start-up slack
    text = log.read_text()
    assert "database unavailable while" in text and "Traceback" not in text
    # the heartbeat says it fails once, not once a second
    assert text.count("heartbeat of ticket") <= 2, text
    private_pg.start()  # the trial is still RUNNING, its ticket held: the stale sweep's
    assert counts(url, name)["RUNNING"] == 1


def test_worker_check_says_alive_and_ready_from_the_workers_own_health_file(
    tmp_path: Path, sqlite_url: str
) -> None:
    health = {"HPO_HEALTH_FILE": str(tmp_path / "worker.health"), "HPO_HEALTH_MAX_AGE": "8"}

    def check(*flags: str) -> subprocess.CompletedProcess[str]:
        return run_cli("hpo-worker", "--check", *flags, **health)

    before = check()
    assert before.returncode == 1 and "no health file" in before.stderr
    # waiting for a database that does not answer: alive, not ready
    nowhere = start_worker(url=f"postgresql+psycopg2://u@127.0.0.1:{free_port()}/x", **health)
    wait_until("a health file", lambda: check().returncode == 0)
    assert check("--ready").returncode == 1
    assert "does not reach the database" in check("--ready").stderr
    nowhere.send_signal(signal.SIGTERM)
    assert nowhere.wait(timeout=30) == 0
    # a worker running a trial longer than the file's maximum age: alive and ready throughout
    create(tmp_path, sqlite_url, session="tests.sessions:sleepy",
           static={"sleep_s": 12, "dir": str(tmp_path)}, study_={"n_trials": 1})  # fmt: skip
    worker = start_worker("--idle-exit", "1", url=sqlite_url, **health)
    wait_for_a_trial(tmp_path)
    wait_until("ready", lambda: check("--ready").returncode == 0)
    for _ in range(5):  # across the trial, which outlasts HPO_HEALTH_MAX_AGE
        assert check("--ready").returncode == 0
        time.sleep(2)
    assert worker.wait(timeout=60) == 0
    # gone: the file ages past the limit
    wait_until("unhealthy", lambda: check().returncode == 1, timeout=30)
    assert "last said it was alive" in check().stderr


def test_a_worker_waits_for_a_free_connection_instead_of_exiting(
    private_pg,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    url = private_pg.url
    name = create(tmp_path, url, study_={"n_trials": 2})
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    held = []
    try:
        while True:  # take every connection the server has
            try:
                held.append(engine.connect())
            except sa.exc.OperationalError as e:
                assert "too many clients" in str(e)
                break
        log = tmp_path / "w.log"
        worker = start_worker("--idle-exit", "2", url=url, log=log)
        wait_until("the waiting line", lambda: "no free connection" in log.read_text())
        time.sleep(6)  # three times --idle-exit: a full server is neither gone nor idle
        assert worker.poll() is None, log.read_text()
    finally:
        for conn in held:
            conn.close()
        engine.dispose()
    assert worker.wait(timeout=120) == 0, log.read_text()
    assert counts(url, name)["COMPLETE"] == 2
    assert log.read_text().count("no free connection") == 1  # said once


def test_64_workers_fit_in_a_stock_postgresql(
    pg_url: str, pg_admin: sa.Engine, tmp_path: Path
) -> None:
    database = sa.engine.make_url(pg_url).database
    with pg_admin.connect() as conn:
        max_connections = int(conn.execute(sa.text("show max_connections")).scalar_one())
    assert max_connections <= 100
    name = create(
        tmp_path, pg_url, static={"sleep_s": 0.2},
        study_={"n_trials": 192, "heartbeat_interval": 5, "grace_period": 20},  # the defaults
    )  # fmt: skip
    log = tmp_path / "workers.log"
    pool = start_worker("--processes", "64", "--idle-exit", "4", url=pg_url, log=log)
    assert database
    peak = peak_connections(pool, pg_admin, database)
    assert pool.returncode == 0, log.read_text()[-3000:]
    assert peak <= 2 * 64 and peak < max_connections, peak
    c = counts(pg_url, name)
    assert c["COMPLETE"] == 192 and c["FAIL"] == 0
    text = log.read_text()
    assert "too many clients" not in text and "Traceback" not in text
    assert len({t.user_attrs["worker"] for t in trials(pg_url, name)}) >= 48


def test_128_workers_on_100_connections_lose_no_trial(private_pg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """More worker processes than the server has connections, no pooler, two cores: the
    workers without a connection wait for one, none exits, and the budget is met exactly.
    What failed trials here: a sync inside a transaction outliving
    idle_in_transaction_session_timeout; heartbeats that needed a second connection from a
    full server (now written on the process's own connection as it is handed back); and
    sweepers re-queueing on a second connection while holding the study's lock (stalled).
    Since then 0 FAIL in every run: five on 2026-12-07 at the default 20 s grace period or
    less (beside two or four CPU hogs, one at 6 s), and bench/fleet.py's 128 and 256."""
    url = private_pg.url
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        assert int(conn.execute(sa.text("show max_connections")).scalar_one()) == 100
    engine.dispose()
    name = create(
        tmp_path, url, session="tests.sessions:sleepy", static={"sleep_s": 0.5},
        # Twice the default grace period: what is tested is a trial held without a free
        # connection, not two cores starved by 256 processes (0 FAIL at 20 s too, 4 runs).
        study_={"n_trials": 256, "heartbeat_interval": 5, "grace_period": 40},
    )  # fmt: skip
    log = tmp_path / "workers.log"
    pool = start_worker("--processes", "128", "--idle-exit", "5", url=url, log=log)
    assert pool.wait(timeout=900) == 0, log.read_text()[-3000:]
    c = counts(url, name)
    text = log.read_text()
    errors = [t.user_attrs.get("error") for t in trials(url, name) if t.state.name == "FAIL"]
    assert c["COMPLETE"] == 256 and c["FAIL"] == 0, (c, errors, text[-3000:])
    assert "died with status" not in text and "Traceback" not in text
    assert "recovered by another worker" not in text and "result dropped" not in text
    assert "no free connection" in text  # the server was full indeed


def _fill_server(url: str) -> list[Any]:
    """Take every connection slot the server has left (superuser's reserved ones too)."""
    import psycopg2

    u = sa.engine.make_url(url)
    taken: list[Any] = []
    while len(taken) < 300:
        try:
            taken.append(
                psycopg2.connect(host=u.host, port=u.port, user=u.username, dbname=u.database)
            )
        except psycopg2.OperationalError as e:
            assert "too many clients" in str(e), e
            return taken
    raise AssertionError("the server never filled up")


def test_a_beat_due_while_the_main_thread_holds_the_connection_needs_no_second_one(
    private_pg,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """On a full server a worker's main thread may hold the process's one connection for
    seconds at a time (128 processes on two cores). A beat due meanwhile is written as the
    connection is handed back, so the ticket never looks silent to the other workers."""
    url, worker, grace = private_pg.url, "t:1", 4.0
    create(tmp_path, url)
    storage = open_storage(url, create_schema=False, role="hpo-worker")
    with storage.engine.connect() as conn:
        study_id = conn.execute(sa.text("select study_id from hpo_studies")).scalar_one()
    ticket = Tickets(storage.engine).claim(study_id, worker, grace, "k")
    assert ticket is not None
    silence = sa.text(f"select {PG_NOW_SQL} - beat_at from hpo_tickets where ticket_id = :t")
    fillers: list[Any] = []
    silences: list[float] = []
    try:
        with Heartbeat(storage) as heartbeat:
            heartbeat.track(ticket, worker, interval=0.5, grace=grace)
            fillers = _fill_server(url)  # no second connection for anyone
            for _ in range(8):  # 8 s, twice the grace period
                with storage.engine.connect() as conn:
                    time.sleep(1.0)  # the main thread's work, holding the connection
                    silences.append(conn.execute(silence, {"t": ticket}).scalar_one())
            heartbeat.untrack()
    finally:
        for filler in fillers:
            filler.close()
        storage.engine.dispose()
    assert fillers, "the server was not full"
    assert max(silences) < grace, silences


def test_a_busy_connection_gets_one_beat_an_interval_not_more(pg_url: str, tmp_path: Path) -> None:
    """Handed-over beats do not add up: with the main thread holding the connection most of
    the time, the ticket is still beaten about once an interval (each beat is a commit)."""
    create(tmp_path, pg_url)
    storage = open_storage(pg_url, create_schema=False, role="hpo-worker")
    with storage.engine.connect() as conn:
        study_id = conn.execute(sa.text("select study_id from hpo_studies")).scalar_one()
    tickets = Tickets(storage.engine)
    ticket = tickets.claim(study_id, "t:1", 20.0, "k")
    assert ticket is not None
    beats: list[float] = []
    try:
        with Heartbeat(storage) as heartbeat:
            for name in ("beat", "beat_on"):  # count every beat, the thread's and handed-over
                original = getattr(heartbeat._tickets, name)

                def counted(*args: Any, _original: Any = original) -> bool:
                    beats.append(time.monotonic())
                    return bool(_original(*args))

                setattr(heartbeat._tickets, name, counted)
            heartbeat.track(ticket, "t:1", interval=0.5, grace=20.0)
            started = time.monotonic()
            while time.monotonic() - started < 4.0:  # 8 intervals, the connection mostly busy
                with storage.engine.connect() as conn:
                    conn.execute(sa.text("select pg_sleep(0.05)"))
            heartbeat.untrack()
    finally:
        storage.engine.dispose()
    assert 4 <= len(beats) <= 10, [round(b - started, 2) for b in beats]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_beat_between_settling_and_untracking_is_no_lost_worker(
    pg_url: str, tmp_path: Path
) -> None:
    """A result settles its ticket a moment before the main thread stops tracking it; a beat
    in between finds the ticket gone. That is no lost worker (128 workers logged dozens of
    false "recovered by another worker" lines). A ticket another worker took over and settled
    is missed again at the next beat while still tracked: that one is reported, once."""
    create(tmp_path, pg_url)
    storage = open_storage(pg_url, create_schema=False, role="hpo-worker")
    with storage.engine.connect() as conn:
        study_id = conn.execute(sa.text("select study_id from hpo_studies")).scalar_one()
    tickets = Tickets(storage.engine)
    said = _Lines()
    logging.getLogger("hpo.heartbeat").addHandler(said)
    beats: list[bool] = []
    try:
        with Heartbeat(storage) as heartbeat:
            original = heartbeat._tickets.beat

            def counted(*args: Any) -> bool:
                beats.append(original(*args))
                return beats[-1]

            heartbeat._tickets.beat = counted  # type: ignore[method-assign]
            for key, lost in (("settled", False), ("taken", True)):
                ticket = tickets.claim(study_id, "t:1", 20.0, key)
                assert ticket is not None
                heartbeat.track(ticket, "t:1", interval=0.2, grace=20.0)
                wait_until("a beat", lambda: bool(beats) and beats[-1])
                holder = "t:1"
                if lost:  # another worker's sweep: take it over, then settle it
                    with storage.engine.begin() as conn:
                        conn.execute(
                            sa.text("update hpo_tickets set worker = 'other:1' "
                                    "where ticket_id = :t"), {"t": ticket},
                        )  # fmt: skip
                    holder = "other:1"
                beats.clear()
                assert tickets.settle(ticket, holder, returned=False, failure=False)
                wait_until("a missed beat", lambda: bool(beats) and not beats[-1])
                if lost:
                    wait_until("a second one", lambda: beats.count(False) >= 3)
                heartbeat.untrack()
                reported = [line for line in said.lines if "recovered by another worker" in line]
                assert len(reported) == int(lost), said.lines
    finally:
        logging.getLogger("hpo.heartbeat").removeHandler(said)
        storage.engine.dispose()


def test_a_failure_is_settled_on_one_connection_when_the_server_is_full(
    private_pg,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """Re-queueing a failed trial's point holds the study's lock; it must not need a second
    connection meanwhile: a hundred sweepers each holding one and waiting for another on a
    full server would stall the pool for good (it did, with 128 workers)."""
    url = private_pg.url
    name = create(tmp_path, url, study_={"max_retries": 1})
    study = optuna.load_study(study_name=name, storage=url)
    failed_trial = study.ask({"x": optuna.distributions.FloatDistribution(-5, 5)})
    study.tell(failed_trial, state=optuna.trial.TrialState.FAIL)
    failed = study.trials[-1]
    storage = open_storage(url, create_schema=False, role="hpo-worker")
    registry = Registry(storage.engine)
    record = registry.get(name)
    ledger = Ledger(Backend(storage), record.study_id, name, 1)
    fillers: list[Any] = []
    try:
        fillers = _fill_server(url)  # the process keeps the one connection it has
        with without_waiting():  # a second connection would fail this within a second
            requeue_once(ledger, failed)
    finally:
        for filler in fillers:
            filler.close()
        storage.engine.dispose()
    assert fillers, "the server was not full"
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.system_attrs[REQUEUED_FROM_ATTR] for t in waiting] == [failed._trial_id]
    assert waiting[0].system_attrs["fixed_params"] == failed.params


def test_dropped_connections_delay_work_but_lose_nothing(
    pg_url: str, pg_admin: sa.Engine, tmp_path: Path
) -> None:
    database = sa.engine.make_url(pg_url).database
    name = create(tmp_path, pg_url, static={"sleep_s": 0.1}, study_={"n_trials": 60})
    log = tmp_path / "workers.log"
    pool = start_worker("--processes", "4", "--idle-exit", "3", url=pg_url, log=log)
    kill = sa.text(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity "
        "where datname = :d and application_name like 'hpo-worker:%'"
    )
    terminated = 0
    for _ in range(6):
        time.sleep(0.5)
        with pg_admin.connect() as conn:
            terminated += int(conn.execute(kill, {"d": database}).scalar_one())
    assert pool.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert terminated > 0
    c = counts(pg_url, name)
    assert c["COMPLETE"] == 60 and c["RUNNING"] == 0 and c["WAITING"] == 0
    assert "Traceback" not in log.read_text()


def test_a_session_this_host_may_not_import_is_skipped_and_shown_per_worker(
    pg_url: str, tmp_path: Path
) -> None:
    """Outside this worker's HPO_SESSION_MODULES: its host's business, not the study's."""
    name = create(tmp_path, pg_url)
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text("update hpo_studies set session_ref = 'os:system'"))
    worker = start_worker("--idle-exit", "2", url=pg_url, log=tmp_path / "w.log")
    assert worker.wait(timeout=60) == 0
    with engine.connect() as conn:
        state, error = conn.execute(sa.text("select state, error from hpo_studies")).one()
    engine.dispose()
    assert (state, error) == ("open", None)
    assert counts(pg_url, name) == {}
    summary = json.loads(run_cli("hpo-inspect", name, "--format", "json", url=pg_url).stdout)
    [(worker_id, why)] = summary["cannot_serve"].items()
    assert worker_id.endswith(f":{worker.pid}")
    assert "module 'os' is outside the allowed prefixes" in why
    table = run_cli("hpo-inspect", name, url=pg_url).stdout
    assert "workers that cannot serve it here" in table


def test_workers_with_different_session_modules_share_a_study(pg_url: str, tmp_path: Path) -> None:
    """A worker whose HPO_SESSION_MODULES lacks the study's module skips it; the others
    serve it to the end, and the study never fails. (Trials of 0.5 s: the narrow worker must
    find the study open, on a loaded machine too; one with no budget left is not loaded.)"""
    name = create(tmp_path, pg_url, static={"sleep_s": 0.5}, study_={"n_trials": 6})
    narrow = start_worker("--idle-exit", "3", url=pg_url, HPO_SESSION_MODULES="experiments")
    wide = start_worker("--idle-exit", "3", url=pg_url)
    try:
        assert wide.wait(timeout=120) == 0 and narrow.wait(timeout=120) == 0
    finally:
        for proc in (narrow, wide):
            if proc.poll() is None:
                proc.kill()
    c = counts(pg_url, name)
    assert c["COMPLETE"] == 6 and c["FAIL"] == 0
    summary = json.loads(run_cli("hpo-inspect", name, "--format", "json", url=pg_url).stdout)
    assert summary["state"] == "done"
    assert [w.rsplit(":", 1)[1] for w in summary["cannot_serve"]] == [str(narrow.pid)]


def test_stop_lets_running_trials_finish_and_takes_no_new_ones(
    pg_url: str, tmp_path: Path
) -> None:
    name = create_sleepy(tmp_path, pg_url, 1.0, 50)
    worker = start_worker("--idle-exit", "2", url=pg_url)
    wait_for_a_trial(tmp_path)
    result = run_cli("hpo-coordinator", "stop", name, url=pg_url)
    assert result.stdout == f"study '{name}' stopped; running trials will finish\n"
    assert worker.wait(timeout=30) == 0
    c = counts(pg_url, name)
    assert c["RUNNING"] == 0 and 1 <= c["COMPLETE"] <= 2
    summary = json.loads(run_cli("hpo-inspect", name, "--format", "json", url=pg_url).stdout)
    assert summary["state"] == "stopped"


def test_several_open_studies_are_all_served(pg_url: str, tmp_path: Path) -> None:
    a = create(tmp_path, pg_url, name="study-a", study_={"n_trials": 5})
    b = create(tmp_path, pg_url, name="study-b", study_={"n_trials": 5})
    pool = start_worker("--processes", "2", "--idle-exit", "2", url=pg_url)
    assert pool.wait(timeout=120) == 0
    assert counts(pg_url, a)["COMPLETE"] == 5 and counts(pg_url, b)["COMPLETE"] == 5


def test_worker_with_study_filter_serves_only_that_study(pg_url: str, tmp_path: Path) -> None:
    a = create(tmp_path, pg_url, name="only-me", study_={"n_trials": 3})
    b = create(tmp_path, pg_url, name="not-me", study_={"n_trials": 3})
    worker = start_worker("--study", a, "--idle-exit", "2", url=pg_url)
    assert worker.wait(timeout=60) == 0
    assert counts(pg_url, a)["COMPLETE"] == 3 and sum(counts(pg_url, b).values()) == 0


def test_a_worker_for_a_study_not_created_yet_waits_for_it(pg_url: str, tmp_path: Path) -> None:
    # a schema with another study in it: the worker is past waiting for the coordinator
    other = create(tmp_path, pg_url, name="other", study_={"n_trials": 1})
    log = tmp_path / "w.log"
    worker = start_worker("--study", "late", "--idle-exit", "1", url=pg_url, log=log)
    wait_until("the waiting line", lambda: "waiting for it to be created" in log.read_text())
    time.sleep(3)  # three times --idle-exit: not idleness, since the study is not there yet
    assert worker.poll() is None, log.read_text()
    late = create(tmp_path, pg_url, name="late", study_={"n_trials": 3})
    assert worker.wait(timeout=60) == 0
    assert counts(pg_url, late)["COMPLETE"] == 3 and sum(counts(pg_url, other).values()) == 0


def test_a_worker_says_which_open_study_it_cannot_serve_and_skips_finished_ones(
    pg_url: str, tmp_path: Path
) -> None:
    done = create(tmp_path, pg_url, name="done", study_={"n_trials": 1})
    assert start_worker("--idle-exit", "1", url=pg_url).wait(timeout=60) == 0
    assert counts(pg_url, done)["COMPLETE"] == 1
    elsewhere = create(tmp_path, pg_url, name="elsewhere", study_={"n_trials": 2})
    log = tmp_path / "w.log"
    narrow = {"HPO_SESSION_MODULES": "experiments"}  # tests.sessions is not allowed here
    assert start_worker("--idle-exit", "1", url=pg_url, log=log, **narrow).wait(timeout=60) == 0
    text = log.read_text()
    assert f"waiting for work (open studies this host cannot serve: {elsewhere!r}" in text
    assert "no open study with budget left" not in text
    # the finished study's session was never loaded: one "cannot serve" line, for the open one
    assert text.count("cannot serve study") == 1, text


def test_gpus_option_runs_one_process_per_gpu(pg_url: str, tmp_path: Path) -> None:
    out = tmp_path / "cfgs.jsonl"
    name = create(
        tmp_path, pg_url, session="tests.sessions:echo_cfg",
        static={"out": str(out)}, study_={"n_trials": 6},
    )  # fmt: skip
    log = tmp_path / "w.log"
    pool = start_worker("--gpus", "0,1", "--idle-exit", "2", url=pg_url, log=log)
    assert pool.wait(timeout=60) == 0
    assert log.read_text().count("on GPUs 0,1") == 1
    assert counts(pg_url, name)["COMPLETE"] == 6


def test_a_postgresql_restart_mid_run_loses_nothing(private_pg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = private_pg.url
    name = create(tmp_path, url, static={"sleep_s": 0.2}, study_={"n_trials": 40})
    log = tmp_path / "workers.log"
    pool = start_worker("--processes", "4", "--idle-exit", "3", url=url, log=log)
    wait_until("some trials", lambda: counts(url, name)["COMPLETE"] >= 5)
    private_pg.restart()
    assert pool.wait(timeout=180) == 0, log.read_text()[-3000:]
    c = counts(url, name)
    assert c["COMPLETE"] == 40 and c["RUNNING"] == 0 and c["WAITING"] == 0, c
    text = log.read_text()
    assert "database unavailable" in text and "database is back" in text
    assert "Traceback" not in text


def test_a_worker_killed_between_claim_and_trial_leaks_no_ticket(
    pg_url: str, tmp_path: Path
) -> None:
    """What a worker killed in the milliseconds between claiming a ticket and binding its
    trial leaves behind: a silent ticket, and a trial row made on it. Both are recovered."""
    import optuna

    name = create(tmp_path, pg_url, study_={"n_trials": 3})
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        study_id = conn.execute(sa.text("select study_id from hpo_studies")).scalar_one()
        conn.execute(sa.text("update hpo_studies set claimed = claimed + 1"))
        ticket = conn.execute(
            sa.text(
                "insert into hpo_tickets (ticket_key, study_id, worker, grace, beat_at) "
                "values ('k', :s, 'dead:1', 3, extract(epoch from now()) - 600) "
                "returning ticket_id"
            ),
            {"s": study_id},
        ).scalar_one()
    storage = optuna.storages.RDBStorage(pg_url, skip_table_creation=True)
    orphan = optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING)
    orphan.state = optuna.trial.TrialState.RUNNING
    orphan.system_attrs = {"hpo:ticket": ticket}
    storage.create_new_trial(study_id, template_trial=orphan)
    storage.engine.dispose()
    log = tmp_path / "w.log"
    worker = start_worker("--idle-exit", "3", url=pg_url, log=log)
    assert worker.wait(timeout=120) == 0
    c = counts(pg_url, name)
    assert c["COMPLETE"] == 3 and c["FAIL"] == 1 and c["RUNNING"] == 0, c
    with engine.connect() as conn:
        assert conn.execute(sa.text("select claimed from hpo_studies")).scalar_one() == 3
        assert conn.execute(sa.text("select count(*) from hpo_tickets")).scalar_one() == 0
    engine.dispose()
    assert "failed: worker dead:1 lost (no heartbeat for 60" in log.read_text()


def test_a_retry_carries_on_from_the_checkpoint_of_a_killed_worker(
    pg_url: str, tmp_path: Path, checkpoint_store: Store
) -> None:
    create(
        tmp_path, pg_url, session="tests.sessions:checkpointed", enqueue=[{"x": 0.7}],
        static={"dir": str(tmp_path), "epoch_s": 0.2}, study_={"n_trials": 1},
        checkpoints=checkpoint_store.config,
    )  # fmt: skip
    victim = start_worker(url=pg_url, **checkpoint_store.env)
    wait_until("epoch 5 of the first attempt", lambda: (tmp_path / "epoch-0-5").exists())
    os.killpg(victim.pid, signal.SIGKILL)  # the executor dies with it (PR_SET_PDEATHSIG)
    victim.wait(timeout=30)
    reached = max(int(p.name.split("-")[2]) for p in tmp_path.glob("epoch-0-*"))
    (saved,) = checkpoint_store.saved().values()
    assert saved["epoch"] in (reached, reached + 1)  # the last save survived the kill
    retry = start_worker("--idle-exit", "2", url=pg_url, **checkpoint_store.env)
    assert retry.wait(timeout=180) == 0
    retried = sorted(int(p.name.split("-")[2]) for p in tmp_path.glob("epoch-1-*"))
    # from the last checkpoint (an upload sent just before the kill may land after the look)
    assert retried[0] in (reached, reached + 1) and retried[0] >= 5  # not from epoch 0
    assert retried == list(range(retried[0], 20))
    (done,) = [t for t in trials(pg_url, "pool") if t.state.name == "COMPLETE"]
    uninterrupted = sum(math.sin(0.7 * (epoch + 1)) for epoch in range(20))
    assert done.value == pytest.approx(uninterrupted, abs=1e-12)
    assert checkpoint_store.saved() == {}  # a finished point's checkpoint goes


def test_a_longer_idle_poll_cuts_an_idle_worker_s_queries(
    pg_url: str, pg_admin: sa.Engine, tmp_path: Path
) -> None:
    """docs/DEPLOYMENT.md, capacity: ``HPO_IDLE_POLL_MAX=5`` for fleets of thousands. An idle
    worker runs far fewer transactions with it than with the default 0.25 s poll."""
    database = sa.engine.make_url(pg_url).database
    create(tmp_path, pg_url, study_={"n_trials": 1})  # the schema, and a study to stop
    query = sa.text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :d")

    def commits_while_idle(**env: str) -> int:
        log = tmp_path / f"idle-{len(env)}.log"
        worker = start_worker(url=pg_url, log=log, **env)
        wait_until("the worker to wait for work", lambda: "waiting for work" in log.read_text())
        time.sleep(2)  # its first polls, and the statistics of the start, are flushed
        with pg_admin.connect() as conn:
            before = int(conn.execute(query, {"d": database}).scalar_one())
        time.sleep(10)
        with pg_admin.connect() as conn:
            after = int(conn.execute(query, {"d": database}).scalar_one())
        worker.terminate()
        assert worker.wait(timeout=60) == 0
        return after - before

    assert run_cli("hpo-coordinator", "stop", "pool", url=pg_url).returncode == 0  # no work
    default, slow = commits_while_idle(), commits_while_idle(HPO_IDLE_POLL_MAX="5")
    assert default > 20 and slow < default / 2, (default, slow)
