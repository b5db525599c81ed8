"""The framework's own table beside Optuna's: one row per study, the pool's control plane.

``hpo_studies`` holds what a worker needs to serve a study (the stored config, the session
reference) and the budget as a counter of *tickets*. A worker runs a trial only after winning a
ticket with one conditional UPDATE, so the number of trials never exceeds ``n_trials`` however
many workers race; a failed trial hands its ticket back so its parameters can run again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from hpo_framework.exceptions import StudyNotFoundError
from hpo_framework.optuna_tables import heartbeats

metadata = sa.MetaData()
hpo_studies = sa.Table(
    "hpo_studies",
    metadata,
    sa.Column("study_id", sa.Integer, primary_key=True),  # Optuna's studies.study_id
    sa.Column("study_name", sa.String(512), nullable=False, unique=True),
    sa.Column("state", sa.String(16), nullable=False),  # open | stopped | failed
    sa.Column("budget", sa.Integer, nullable=True),  # n_trials; NULL: until timeout/stop
    sa.Column("claimed", sa.Integer, nullable=False, default=0),  # tickets taken, not returned
    sa.Column("failures", sa.Integer, nullable=False, default=0),
    sa.Column("max_failures", sa.Integer, nullable=True),
    sa.Column("deadline", sa.Float, nullable=True),  # epoch seconds, by the database's clock
    sa.Column("config_json", sa.Text, nullable=False),
    sa.Column("config_hash", sa.String(64), nullable=False),
    sa.Column("session_ref", sa.String(512), nullable=True),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("error", sa.Text, nullable=True),  # why a study was failed by the framework
)

#: A ticket between its claim and the moment its trial is covered by a heartbeat. A worker
#: killed in that window leaves its lease behind; live workers reclaim it after the grace
#: period and hand the ticket back (see ``reclaim_leases``).
hpo_leases = sa.Table(
    "hpo_leases",
    metadata,
    sa.Column("lease_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_id", sa.Integer, nullable=False, index=True),
    sa.Column("worker", sa.String(300), nullable=False),
    sa.Column("claimed_at", sa.Float, nullable=False),  # epoch seconds, database clock
)

OPEN, STOPPED, FAILED = "open", "stopped", "failed"


@dataclass(frozen=True)
class StudyRecord:
    study_id: int
    name: str
    state: str
    budget: int | None
    claimed: int
    failures: int
    max_failures: int | None
    deadline: float | None
    config: Mapping[str, Any]
    config_hash: str
    session_ref: str | None
    version: str
    created_at: float
    error: str | None
    now: float  # the database's clock when this row was read

    @property
    def timed_out(self) -> bool:
        return self.deadline is not None and self.now >= self.deadline

    @property
    def claimable(self) -> bool:
        budget_left = self.budget is None or self.claimed < self.budget
        return self.state == OPEN and budget_left and not self.timed_out


def db_now(engine: Engine) -> sa.ColumnElement[float]:
    """The database server's clock in epoch seconds: the one clock all workers agree on."""
    if engine.dialect.name == "postgresql":
        return sa.literal_column("extract(epoch from clock_timestamp())", sa.Float)
    if engine.dialect.name == "sqlite":
        return sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)", sa.Float)
    return sa.literal_column("UNIX_TIMESTAMP(NOW(6))", sa.Float)


class Registry:
    """Reads and conditional writes of ``hpo_studies`` over one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._now = db_now(engine)

    def create_table(self) -> None:
        metadata.create_all(self.engine)

    def add(
        self,
        *,
        study_id: int,
        name: str,
        budget: int | None,
        max_failures: int | None,
        timeout: float | None,
        config: Mapping[str, Any],
        config_hash: str,
        session_ref: str | None,
        version: str,
    ) -> None:
        with self.engine.begin() as conn:
            now = conn.execute(sa.select(self._now)).scalar_one()
            conn.execute(
                hpo_studies.insert().values(
                    study_id=study_id,
                    study_name=name,
                    state=OPEN,
                    budget=budget,
                    claimed=0,
                    failures=0,
                    max_failures=max_failures,
                    deadline=None if timeout is None else now + timeout,
                    config_json=json.dumps(config),
                    config_hash=config_hash,
                    session_ref=session_ref,
                    version=version,
                    created_at=now,
                )  # fmt: skip
            )

    def get(self, name: str) -> StudyRecord:
        records = self._select(hpo_studies.c.study_name == name)
        if not records:
            raise StudyNotFoundError(f"no study named {name!r} in this storage")
        return records[0]

    def find(self, name: str) -> StudyRecord | None:
        records = self._select(hpo_studies.c.study_name == name)
        return records[0] if records else None

    def all(self) -> list[StudyRecord]:
        return self._select(sa.true())

    def open(self) -> list[StudyRecord]:
        return self._select(hpo_studies.c.state == OPEN)

    def claim_ticket(self, study_id: int, worker: str) -> int | None:
        """Take one unit of budget; the lease id if this process won it, else None.

        One conditional UPDATE: the database serializes concurrent claimers on the row, and
        only those that still see ``claimed < budget`` get a row count of 1. This is what makes
        the budget exact, where counting finished trials after the fact overshoots. The lease
        is written in the same transaction, so a claim never exists without one.
        """
        c = hpo_studies.c
        stmt = (
            hpo_studies.update()
            .where(c.study_id == study_id, c.state == OPEN)
            .where(sa.or_(c.budget.is_(None), c.claimed < c.budget))
            .where(sa.or_(c.deadline.is_(None), c.deadline > self._now))
            .values(claimed=c.claimed + 1)
        )
        with self.engine.begin() as conn:
            if conn.execute(stmt).rowcount != 1:
                return None
            lease = hpo_leases.insert().values(
                study_id=study_id, worker=worker, claimed_at=self._now
            )
            return int(conn.execute(lease.returning(hpo_leases.c.lease_id)).scalar_one())

    def cover_trial(self, lease_id: int, trial_id: int) -> bool:
        """Turn a lease into the trial's first heartbeat, atomically; False if it was reclaimed.

        From here on the trial's heartbeat stands for the ticket: the stale sweep returns it
        if the worker dies. Doing both in one transaction means a ticket is never covered twice
        (lease reclaimed *and* stale trial failed) nor not at all. Safe to retry: a heartbeat
        already there means an earlier try committed.
        """
        with self.engine.begin() as conn:
            beat = sa.select(heartbeats.c.trial_id).where(heartbeats.c.trial_id == trial_id)
            if conn.execute(beat).first() is not None:
                return True
            gone = conn.execute(hpo_leases.delete().where(hpo_leases.c.lease_id == lease_id))
            if gone.rowcount != 1:
                return False
            conn.execute(
                heartbeats.insert().values(
                    trial_id=trial_id, heartbeat=sa.func.current_timestamp()
                )
            )
        return True

    def reclaim_leases(self, study_id: int, older_than: float) -> list[str]:
        """Hand back the tickets of leases older than ``older_than`` seconds (their workers died
        or froze between claim and trial); returns those workers. One winner per lease: the
        DELETE locks the rows it removes."""
        stale = sa.and_(
            hpo_leases.c.study_id == study_id, hpo_leases.c.claimed_at < self._now - older_than
        )
        with self.engine.begin() as conn:
            gone = conn.execute(hpo_leases.delete().where(stale).returning(hpo_leases.c.worker))
            workers = [str(w) for (w,) in gone]
            if workers:
                c = hpo_studies.c
                conn.execute(
                    hpo_studies.update()
                    .where(c.study_id == study_id)
                    .values(claimed=c.claimed - len(workers))
                )
        return workers

    def return_ticket(self, study_id: int, *, failed: bool) -> str:
        """Give a ticket back (its trial failed, or never started); returns the study's state.

        A failure also counts towards ``max_failures``; the study that reaches it is failed in
        the same statement, so no worker claims a ticket of it afterwards.
        """
        c = hpo_studies.c
        failures = c.failures + (1 if failed else 0)
        reached = sa.and_(c.state == OPEN, c.max_failures.is_not(None), failures >= c.max_failures)
        values: dict[str, Any] = {"claimed": c.claimed - 1, "failures": failures}
        if failed:
            values["state"] = sa.case((reached, FAILED), else_=c.state)
            values["error"] = sa.case(
                (reached, sa.literal("max_failed_trials reached")), else_=c.error
            )
        with self.engine.begin() as conn:
            conn.execute(hpo_studies.update().where(c.study_id == study_id).values(**values))
            state = conn.execute(sa.select(c.state).where(c.study_id == study_id)).scalar_one()
        return str(state)

    def set_state(self, name: str, state: str, error: str | None = None) -> bool:
        """Move an open study to ``state``; False if it was not open."""
        c = hpo_studies.c
        stmt = hpo_studies.update().where(c.study_name == name, c.state == OPEN)
        values: dict[str, Any] = {"state": state}
        if error is not None:
            values["error"] = error[:2000]
        with self.engine.begin() as conn:
            return conn.execute(stmt.values(**values)).rowcount == 1

    def reopen(self, name: str, timeout: float | None) -> None:
        """Resume a study: open again, with a fresh deadline counted from now."""
        c = hpo_studies.c
        deadline = None if timeout is None else self._now + timeout
        with self.engine.begin() as conn:
            conn.execute(
                hpo_studies.update()
                .where(c.study_name == name)
                .values(state=OPEN, deadline=deadline, error=None, failures=0)
            )

    def delete(self, name: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(hpo_studies.delete().where(hpo_studies.c.study_name == name))

    def _select(self, where: Any) -> list[StudyRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(hpo_studies, self._now.label("now"))
                .where(where)
                .order_by(hpo_studies.c.study_id)
            ).all()
        return [
            StudyRecord(
                study_id=r.study_id,
                name=r.study_name,
                state=r.state,
                budget=r.budget,
                claimed=r.claimed,
                failures=r.failures,
                max_failures=r.max_failures,
                deadline=r.deadline,
                config=json.loads(r.config_json),
                config_hash=r.config_hash,
                session_ref=r.session_ref,
                version=r.version,
                created_at=r.created_at,
                error=r.error,
                now=float(r.now),
            )  # fmt: skip
            for r in rows
        ]
