"""Tickets: the budget as rows, one per trial in flight; the only way a trial starts and ends.

A worker runs a trial only while it holds a ticket. Every step that changes the budget is
keyed and conditional, so replaying it after a lost answer (the server committed, the reply
never arrived) changes nothing:

* **claim** (key chosen by the worker): take one unit of ``hpo_studies.claimed`` and write
  the ticket, or find the ticket an earlier try already wrote.
* **bind**: the ticket names its trial (a new one, or a waiting point popped in the same
  transaction).
* **settle**: delete the ticket and, in the same statement, give its unit back (the trial
  failed, or never started) or keep it spent. Only the ticket's holder can, and only once.

The ticket is also the trial's heartbeat: ``beat_at`` is written by the database's clock
(epoch seconds, whatever the time zones of server, session or host), and so is every
comparison with it. A ticket silent for longer than its ``grace`` belongs to a lost worker;
a live worker takes it over (one conditional update, one winner) and settles it in
``recovery``. On PostgreSQL, claim and settle are single statements; a worker runs the claim
in the transaction that creates its trial and the settle in the one that records its result
(``trial_store``), short ones: a client frozen inside holds the study's row for at most the
server's ``idle_in_transaction_session_timeout``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from optuna.trial import TrialState
from sqlalchemy.engine import Connection, Engine

from hpo_framework.storage import pg_guards
from hpo_framework.storage.database import retried
from hpo_framework.storage.optuna_tables import (
    trial_system_attrs,
    trial_user_attrs,
    trial_with_system_attr,
)
from hpo_framework.storage.optuna_tables import trials as optuna_trials
from hpo_framework.storage.registry import (
    FAILED,
    OPEN,
    PG_NOW_SQL,
    db_now,
    hpo_studies,
    hpo_tickets,
)
from hpo_framework.storage.trial_attrs import TICKET_ATTR, WORKER_ATTR


@dataclass(frozen=True)
class StaleTicket:
    ticket_id: int
    study_id: int
    worker: str
    trial_id: int | None
    grace: float
    silent_s: float


class Tickets:
    """The ticket protocol over one engine (PostgreSQL: single statements; SQLite: one
    transaction each, which SQLite serializes anyway)."""

    def __init__(self, engine: Engine, *, patient: bool = False) -> None:
        self.engine = engine
        self.patient = patient  # steps wait out outages (a worker's); the heartbeat's do not
        self._pg = engine.dialect.name == "postgresql"
        self._now = db_now(engine)

    # --- claim -------------------------------------------------------------------------------

    @retried("claiming a ticket")
    def claim(self, study_id: int, worker: str, grace: float, key: str) -> int | None:
        """The ticket id if this worker holds one for ``key`` (now or from an earlier try whose
        answer was lost), None if the study has no budget, is not open or has timed out."""
        if self._pg:
            try:
                return self._claim_pg(study_id, worker, grace, key)
            except sa.exc.IntegrityError:
                # An earlier try of this key was still running at the server when this one
                # started; it has committed by now, so this finds its ticket.
                return self._claim_pg(study_id, worker, grace, key)
        with self.engine.begin() as conn:
            old = conn.execute(
                sa.select(hpo_tickets.c.ticket_id).where(hpo_tickets.c.ticket_key == key)
            ).scalar()
            if old is not None:
                return int(old)
            c = hpo_studies.c
            won = conn.execute(
                hpo_studies.update()
                .where(c.study_id == study_id, c.state == OPEN)
                .where(sa.or_(c.budget.is_(None), c.claimed < c.budget))
                .where(sa.or_(c.deadline.is_(None), c.deadline > self._now))
                .values(claimed=c.claimed + 1)
            )
            if won.rowcount != 1:
                return None
            new = hpo_tickets.insert().values(
                ticket_key=key, study_id=study_id, worker=worker, grace=grace, beat_at=self._now
            )
            return int(conn.execute(new.returning(hpo_tickets.c.ticket_id)).scalar_one())

    def _claim_pg(self, study_id: int, worker: str, grace: float, key: str) -> int | None:
        with self.engine.begin() as conn:
            claimed = claim_on(conn, study_id, worker, grace, key)
        return None if claimed is None else claimed[0]

    # --- the trial of a ticket ---------------------------------------------------------------

    @retried("binding a ticket")
    def bind(self, ticket_id: int, worker: str, trial_id: int) -> bool:
        """Record the ticket's new trial; False if the ticket is no longer this worker's."""
        with self.engine.begin() as conn:
            return _bind(conn, ticket_id, worker, trial_id)

    @retried("taking a waiting trial")
    def pop_waiting(self, ticket_id: int, worker: str, trial_id: int) -> bool:
        """Start the waiting trial ``trial_id`` (an enqueued point or a retry) on this ticket:
        WAITING -> RUNNING, the ticket bound and the trial's worker recorded, all in one
        transaction. False if another worker popped it first (or the ticket was taken over).

        Optuna's own pop (``set_trial_state_values``) commits alone, so a worker lost right
        after it would leave a running trial nobody knows is its.
        """
        t = optuna_trials.c
        with self.engine.begin() as conn:
            popped = conn.execute(
                optuna_trials.update()
                .where(t.trial_id == trial_id, t.state == TrialState.WAITING)
                .values(state=TrialState.RUNNING, datetime_start=datetime.now())
            )
            if popped.rowcount != 1 or not _bind(conn, ticket_id, worker, trial_id):
                conn.rollback()
                return False
            conn.execute(
                trial_user_attrs.insert().values(
                    trial_id=trial_id, key=WORKER_ATTR, value_json=json.dumps(worker)
                )
            )
        return True

    @retried("reading a ticket")
    def trial_of(self, ticket_id: int) -> int | None:
        """The trial a ticket started: bound, or created but not yet bound (its holder was
        lost in between; the trial carries the ticket id as a system attribute)."""
        with self.engine.connect() as conn:
            return trial_of_on(conn, ticket_id)

    # --- heartbeat ---------------------------------------------------------------------------

    def beat(self, ticket_id: int, worker: str) -> bool:
        """One heartbeat; False if the ticket was taken over or settled meanwhile."""
        c = hpo_tickets.c
        with self.engine.begin() as conn:
            done = conn.execute(
                hpo_tickets.update()
                .where(c.ticket_id == ticket_id, c.worker == worker)
                .values(beat_at=self._now)
            )
            return done.rowcount == 1

    def beat_on(self, dbapi_connection: Any, ticket_id: int, worker: str) -> bool:
        """``beat`` on a raw PostgreSQL DBAPI connection that is between transactions (the
        pool's ``checkin``: SQLAlchemy has reset it), committed at once."""
        cursor = dbapi_connection.cursor()
        try:
            prefix = pg_guards.per_transaction(self.engine)
            if prefix:
                cursor.execute(prefix)
            cursor.execute(_BEAT_PG, {"t": ticket_id, "w": worker})
            done = bool(cursor.rowcount == 1)
        finally:
            cursor.close()
        dbapi_connection.commit()
        return done

    # --- settle ------------------------------------------------------------------------------

    @retried("settling a ticket")
    def settle(self, ticket_id: int, worker: str, *, returned: bool, failure: bool) -> str | None:
        """End the ticket: its unit of budget goes back if ``returned``; a ``failure`` counts
        towards ``max_failed_trials`` (the study that reaches it is failed in the same
        statement). Returns the study's state, or None if the ticket was not this worker's
        to settle (already settled by an earlier try, or taken over)."""
        if self._pg:
            with self.engine.begin() as conn:
                return settle_on(conn, ticket_id, worker, returned=returned, failure=failure)
        c, t = hpo_studies.c, hpo_tickets.c
        with self.engine.begin() as conn:
            study_id = conn.execute(
                sa.select(t.study_id).where(t.ticket_id == ticket_id, t.worker == worker)
            ).scalar()
            if study_id is None:
                return None
            conn.execute(hpo_tickets.delete().where(t.ticket_id == ticket_id))
            failures = c.failures + int(failure)
            reached = (
                sa.and_(c.state == OPEN, c.max_failures.is_not(None), failures >= c.max_failures)
                if failure
                else sa.false()
            )
            conn.execute(
                hpo_studies.update()
                .where(c.study_id == study_id)
                .values(
                    claimed=c.claimed - int(returned),
                    failures=failures,
                    state=sa.case((reached, FAILED), else_=c.state),
                    error=sa.case((reached, sa.literal(MAX_FAILED)), else_=c.error),
                )
            )
            state = conn.execute(sa.select(c.state).where(c.study_id == study_id)).scalar()
        return None if state is None else str(state)

    # --- recovery ----------------------------------------------------------------------------

    @retried("sweeping")
    def stale(self) -> list[StaleTicket]:
        """Tickets of every study (whatever its state) silent for longer than their grace."""
        t = hpo_tickets.c
        silent = self._now - t.beat_at
        query = sa.select(
            t.ticket_id, t.study_id, t.worker, t.trial_id, t.grace, silent.label("silent")
        ).where(silent > t.grace)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(t.ticket_id)).all()
        return [
            StaleTicket(r.ticket_id, r.study_id, r.worker, r.trial_id, r.grace, float(r.silent))
            for r in rows
        ]

    @retried("taking over a lost ticket")
    def take_over(self, ticket_id: int, worker: str) -> bool:
        """Become the holder of a stale ticket; one live worker wins it. The winner's own
        heartbeat is now the ticket's: if it is lost too, another worker takes over."""
        t = hpo_tickets.c
        with self.engine.begin() as conn:
            won = conn.execute(
                hpo_tickets.update()
                # Or already ours: an earlier try committed and its answer was lost.
                .where(
                    t.ticket_id == ticket_id,
                    sa.or_(self._now - t.beat_at > t.grace, t.worker == worker),
                )
                .values(worker=worker, beat_at=self._now)
            )
            return won.rowcount == 1

    @retried("sweeping")
    def orphans(self) -> list[int]:
        """RUNNING trials made on a ticket that is gone: the trial was created after its
        ticket was recovered (its worker froze between the two). Trials made by other tools
        carry no ticket and are never touched."""
        a, tr = trial_system_attrs.c, optuna_trials.c
        ticket_ids = sa.select(sa.func.cast(hpo_tickets.c.ticket_id, sa.String))
        query = (
            sa.select(tr.trial_id)
            .join(trial_system_attrs, a.trial_id == tr.trial_id)
            .where(
                tr.state == TrialState.RUNNING,
                a.key == TICKET_ATTR,
                a.value_json.not_in(ticket_ids),
            )
        )
        with self.engine.connect() as conn:
            return [int(i) for i in conn.execute(query).scalars()]

    @retried("counting tickets in flight")
    def held(self, study_id: int | None = None) -> int:
        """Tickets held right now, in one study or in all."""
        query = sa.select(sa.func.count()).select_from(hpo_tickets)
        if study_id is not None:
            query = query.where(hpo_tickets.c.study_id == study_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())


MAX_FAILED = "max_failed_trials reached"


def claim_on(
    conn: Connection, study_id: int, worker: str, grace: float, key: str
) -> tuple[int, bool] | None:
    """``Tickets.claim`` inside ``conn``'s transaction (PostgreSQL): the ticket id and whether
    an earlier try of ``key`` had claimed it already; None if there is no budget."""
    row = conn.execute(
        _CLAIM_PG, {"s": study_id, "w": worker, "g": grace, "k": key, "open": OPEN}
    ).first()
    return None if row is None else (int(row.ticket_id), bool(row.replay))


def trial_of_on(conn: Connection, ticket_id: int) -> int | None:
    """``Tickets.trial_of`` on ``conn``."""
    bound = conn.execute(
        sa.select(hpo_tickets.c.trial_id).where(hpo_tickets.c.ticket_id == ticket_id)
    ).scalar()
    if bound is not None:
        return int(bound)
    # Not bound yet: its holder was lost between creating the trial and binding it. Such a
    # trial is still RUNNING; a finished one with this id is an older ticket's (SQLite may
    # reuse the id of a deleted row in a database made before hpo_tickets autoincremented).
    return trial_with_system_attr(conn, TICKET_ATTR, ticket_id, running=True)


def settle_on(
    conn: Connection, ticket_id: int, worker: str, *, returned: bool, failure: bool
) -> str | None:
    """``Tickets.settle`` inside ``conn``'s transaction (PostgreSQL)."""
    params = {"t": ticket_id, "w": worker, "r": int(returned), "f": int(failure)}
    row = conn.execute(_SETTLE_PG, {**params, "open": OPEN, "failed": FAILED}).first()
    return None if row is None else str(row[0])


def _bind(conn: Connection, ticket_id: int, worker: str, trial_id: int) -> bool:
    c = hpo_tickets.c
    done = conn.execute(
        hpo_tickets.update()
        .where(c.ticket_id == ticket_id, c.worker == worker)
        .values(trial_id=trial_id)
    )
    return done.rowcount == 1


_CLAIM_PG = sa.text(
    """
    WITH old AS (SELECT ticket_id FROM hpo_tickets WHERE ticket_key = :k),
    won AS (
        UPDATE hpo_studies SET claimed = claimed + 1
        WHERE study_id = :s AND state = :open
          AND (budget IS NULL OR claimed < budget)
          AND (deadline IS NULL OR deadline > extract(epoch from clock_timestamp()))
          AND NOT EXISTS (SELECT 1 FROM old)
        RETURNING study_id
    ),
    new AS (
        INSERT INTO hpo_tickets (ticket_key, study_id, worker, grace, beat_at)
        SELECT :k, study_id, :w, :g, extract(epoch from clock_timestamp()) FROM won
        RETURNING ticket_id
    )
    SELECT ticket_id, false AS replay FROM new UNION ALL SELECT ticket_id, true FROM old
    """
)

_BEAT_PG = (
    f"UPDATE hpo_tickets SET beat_at = {PG_NOW_SQL} WHERE ticket_id = %(t)s AND worker = %(w)s"
)

_SETTLE_PG = sa.text(
    f"""
    WITH gone AS (
        DELETE FROM hpo_tickets WHERE ticket_id = :t AND worker = :w RETURNING study_id
    )
    UPDATE hpo_studies s SET
        claimed = s.claimed - :r,
        failures = s.failures + :f,
        state = CASE WHEN :f = 1 AND s.state = :open AND s.max_failures IS NOT NULL
                          AND s.failures + 1 >= s.max_failures THEN :failed ELSE s.state END,
        error = CASE WHEN :f = 1 AND s.state = :open AND s.max_failures IS NOT NULL
                          AND s.failures + 1 >= s.max_failures THEN '{MAX_FAILED}'
                     ELSE s.error END
    FROM gone WHERE s.study_id = gone.study_id
    RETURNING s.state
    """
)
