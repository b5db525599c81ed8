"""Behind a transaction pooler: PgBouncer with its default settings, which refuses the
startup option that carries hpo's connection guards. hpo connects again without it and sets
the guards per transaction, so many workers share a few server connections and a frozen
one still stalls nobody."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.conftest import start_worker
from tests.fault_proxy import FaultProxy
from tests.pool_helpers import counts, create, peak_connections, wait_until


def test_96_workers_share_24_server_connections_through_a_default_pgbouncer(
    pg_url: str, pg_admin: sa.Engine, pgbouncer: Any, tmp_path: Path
) -> None:
    database = sa.engine.make_url(pg_url).database
    assert database
    url = pgbouncer.url(database)
    name = create(
        tmp_path, url, static={"sleep_s": 0.2},
        study_={"n_trials": 192, "heartbeat_interval": 5, "grace_period": 20},  # the defaults
    )  # fmt: skip
    log = tmp_path / "workers.log"
    pool = start_worker("--processes", "96", "--idle-exit", "4", url=url, log=log)
    peak = peak_connections(pool, pg_admin, database)
    text = log.read_text()
    assert pool.returncode == 0, text[-3000:]
    c = counts(pg_url, name)
    assert c["COMPLETE"] == 192 and c["FAIL"] == 0, (c, text[-3000:])
    assert 0 < peak <= 24, peak  # the pooler's server connections, never more
    assert "set per transaction" in text
    assert "Traceback" not in text and "died with status" not in text


def test_a_frozen_worker_behind_the_pooler_stalls_nobody_else(
    pg_url: str, pgbouncer: Any, tmp_path: Path
) -> None:
    """As ``test_faults``'s frozen worker, through PgBouncer: the worker stops for good right
    after taking the study's row lock; the guard set in its transaction ends it on the server,
    and the others, through the same pooler, carry on."""
    database = sa.engine.make_url(pg_url).database
    assert database
    fault = FaultProxy(pgbouncer.port)
    try:
        fault.freeze_after("FROM studies", "FOR UPDATE", seconds=300)
        name = create(
            tmp_path, pg_url, static={"sleep_s": 0.05}, session="tests.sessions:sleepy",
            study_={"n_trials": 10},
        )  # fmt: skip
        frozen = start_worker(url=fault.url(database), log=tmp_path / "frozen.log")
        wait_until("the frozen worker to take the lock", lambda: fault.frozen_answers == 1)
        others = start_worker(
            "--processes", "2", url=pgbouncer.url(database), log=tmp_path / "others.log"
        )
        # All but the frozen worker's own trial finish while it still holds its ticket.
        wait_until("the others to run 9 trials", lambda: counts(pg_url, name)["COMPLETE"] >= 9, 90)
        assert frozen.poll() is None and others.poll() is None
    finally:
        fault.close()
