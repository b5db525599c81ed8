"""The framework's own table beside Optuna's: one row per study, the pool's control plane.

``hpo_studies`` holds what a worker needs to serve a study (the stored config, the session
reference) and the budget as a counter of *tickets*. A worker runs a trial only after winning a
ticket (``hpo_framework.storage.tickets``), so the number of trials never exceeds ``n_trials``
however many workers race; a failed trial hands its ticket back so its parameters can run again.
"""

from __future__ import annotations

import contextlib
import enum
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from hpo_framework import defaults
from hpo_framework._checks import did_you_mean
from hpo_framework.exceptions import StudyNotFoundError
from hpo_framework.storage.database import retried
from hpo_framework.storage.optuna_tables import studies, trials

metadata = sa.MetaData()
hpo_studies = sa.Table(
    "hpo_studies",
    metadata,
    sa.Column("study_id", sa.Integer, primary_key=True),  # Optuna's studies.study_id
    sa.Column("study_name", sa.String(512), nullable=False, unique=True),
    sa.Column("state", sa.String(16), nullable=False),  # open | paused | stopped | failed
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

#: One row per trial in flight: the budget's tickets and their heartbeats (``tickets``).
hpo_tickets = sa.Table(
    "hpo_tickets",
    metadata,
    sa.Column("ticket_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ticket_key", sa.String(64), nullable=False, unique=True),
    sa.Column("study_id", sa.Integer, nullable=False, index=True),
    sa.Column("worker", sa.String(300), nullable=False),  # the holder: claimer or recoverer
    sa.Column("trial_id", sa.Integer, nullable=True),  # set once the trial exists
    sa.Column("grace", sa.Float, nullable=False),  # seconds of silence before it is stale
    sa.Column("beat_at", sa.Float, nullable=False),  # epoch seconds, database clock
    sqlite_autoincrement=True,  # ids never reused: a trial names its ticket by id
)

#: One row per live worker process (``presence``); removed when it stops cleanly.
hpo_workers = sa.Table(
    "hpo_workers",
    metadata,
    sa.Column("worker", sa.String(300), primary_key=True),  # host:pid, as in tickets and trials
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("gpus", sa.String(255), nullable=True),  # CUDA_VISIBLE_DEVICES
    sa.Column("serves", sa.String(300), nullable=False),  # --study NAME, or all open studies
    sa.Column("started_at", sa.Float, nullable=False),  # database clock
    sa.Column("seen_at", sa.Float, nullable=False),
)

#: Every value a session logged (``trial().log(step=..., **metrics)``), with its step and the
#: database's time (``metrics``); the JSON keeps an int an int.
hpo_metrics = sa.Table(
    "hpo_metrics",
    metadata,
    sa.Column("metric_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("trial_id", sa.Integer, nullable=False, index=True),  # Optuna's trials.trial_id
    sa.Column("name", sa.String(500), nullable=False),
    sa.Column("step", sa.Integer, nullable=True),
    sa.Column("value_json", sa.Text, nullable=False),
    sa.Column("logged_at", sa.Float, nullable=False),  # epoch seconds, database clock
)


class StudyState(str, enum.Enum):
    """A study's state in ``hpo_studies.state``. A ``str``: it is stored, compared, printed and
    serialized as its value (``"open"``), as the state strings were before."""

    OPEN = "open"
    PAUSED = "paused"
    STOPPED = "stopped"
    FAILED = "failed"

    @classmethod
    def _missing_(cls, value: object) -> StudyState:
        """A state this version does not know (a newer one wrote it): kept as it is, and
        like every state but ``open``, not served."""
        member = str.__new__(cls, str(value))
        member._name_, member._value_ = str(value).upper(), str(value)
        return member

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


OPEN, PAUSED, STOPPED, FAILED = StudyState


@dataclass(frozen=True)
class StudyRecord:
    study_id: int
    name: str
    state: StudyState
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


#: PostgreSQL's clock in epoch seconds, as SQL.
PG_NOW_SQL = "extract(epoch from clock_timestamp())"


def db_now(engine: Engine) -> sa.ColumnElement[float]:
    """The database server's clock in epoch seconds: the one clock all workers agree on."""
    if engine.dialect.name == "postgresql":
        return sa.literal_column(PG_NOW_SQL, sa.Float)
    if engine.dialect.name == "sqlite":
        return sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)", sa.Float)
    return sa.literal_column("UNIX_TIMESTAMP(NOW(6))", sa.Float)


_TRIAL_INDEXES = {
    "hpo_trials_study_state": "study_id, state",
    "hpo_trials_study_number": "study_id, number",
}


def _lost_create_race(e: sa.exc.DatabaseError) -> bool:
    text = str(e.orig).lower()
    return "already exists" in text or "duplicate key" in text


class Registry:
    """Reads and conditional writes of ``hpo_studies`` over one engine. A ``patient`` one (a
    worker's, from ``Backend``) waits out outages in every step; otherwise (the CLI) a step
    fails at once."""

    def __init__(self, engine: Engine, *, patient: bool = False) -> None:
        self.engine = engine
        self.patient = patient
        self._now = db_now(engine)

    @property
    def clock(self) -> sa.ColumnElement[float]:
        """The database's clock, as an SQL expression (deadlines are set by it)."""
        return self._now

    @retried("creating hpo's tables")
    def create_table(self) -> None:
        """hpo's tables, and two indexes on Optuna's ``trials`` that keep a trial's start
        independent of the study's size (the waiting-trial probe and the next number)."""
        for attempt in range(5):
            try:
                metadata.create_all(self.engine)
                break
            except sa.exc.DatabaseError as e:
                # Two processes checked "missing" at once and the other created it first
                # (SQLite: "already exists"; PostgreSQL: a duplicate type or relation).
                if attempt == 4 or not _lost_create_race(e):
                    raise
        for name, columns in _TRIAL_INDEXES.items():
            try:
                create = f"CREATE INDEX IF NOT EXISTS {name} ON trials ({columns})"
                with self.engine.begin() as conn:
                    conn.execute(sa.text(create))
            except sa.exc.IntegrityError:
                pass  # another coordinator created it at the same moment

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
        claimed: int = 0,
    ) -> None:
        with self.engine.begin() as conn:
            # The row of a same-named study that Optuna's tools deleted under us.
            conn.execute(hpo_studies.delete().where(hpo_studies.c.study_name == name))
            now = conn.execute(sa.select(self._now)).scalar_one()
            conn.execute(
                hpo_studies.insert().values(
                    study_id=study_id,
                    study_name=name,
                    state=OPEN,
                    budget=budget,
                    claimed=claimed,  # trials copied in count towards the budget
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

    @retried("reading a study")
    def get(self, name: str) -> StudyRecord:
        records = self._select(hpo_studies.c.study_name == name)
        if not records:
            hint = did_you_mean(
                name, (r.name for r in self.all()), "studies here", "; there is no study here yet"
            )
            raise StudyNotFoundError(f"no study named {name!r} in this storage{hint}")
        return records[0]

    @retried("reading a study")
    def find(self, name: str) -> StudyRecord | None:
        records = self._select(hpo_studies.c.study_name == name)
        return records[0] if records else None

    @retried("listing studies")
    def all(self) -> list[StudyRecord]:
        return self._select(sa.true())

    @retried("listing open studies")
    def open(self) -> list[StudyRecord]:
        return self._select(hpo_studies.c.state == OPEN)

    @retried("reading a study")
    def by_id(self, study_id: int) -> StudyRecord | None:
        records = self._select(hpo_studies.c.study_id == study_id)
        return records[0] if records else None

    @retried("setting a study's state")
    def set_state(self, name: str, state: StudyState, error: str | None = None) -> bool:
        """Move an open study to ``state``; False if it was not open."""
        c = hpo_studies.c
        stmt = hpo_studies.update().where(c.study_name == name, c.state == OPEN)
        values: dict[str, Any] = {"state": state}
        if error is not None:
            values["error"] = error[: defaults.ERROR_TEXT_MAX]
        with self.engine.begin() as conn:
            return conn.execute(stmt.values(**values)).rowcount == 1

    @retried("moving a study's state")
    def move(self, name: str, from_state: StudyState, to_state: StudyState, **values: Any) -> bool:
        """Move the study from ``from_state`` to ``to_state`` (with other column ``values``);
        False if it was not in ``from_state`` (someone else moved it first)."""
        c = hpo_studies.c
        stmt = hpo_studies.update().where(c.study_name == name, c.state == from_state)
        with self.engine.begin() as conn:
            return conn.execute(stmt.values(state=to_state, **values)).rowcount == 1

    @retried("reopening a study")
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

    @retried("deleting a study")
    def delete(self, name: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(hpo_studies.delete().where(hpo_studies.c.study_name == name))

    @retried("deleting metric histories")
    def delete_metrics(self, study_id: int) -> None:
        """The metric histories of a study's trials (before Optuna deletes the trials)."""
        mine = sa.select(trials.c.trial_id).where(trials.c.study_id == study_id)
        with self.engine.begin() as conn:
            conn.execute(hpo_metrics.delete().where(hpo_metrics.c.trial_id.in_(mine)))

    def _select(self, where: Any) -> list[StudyRecord]:
        # A study deleted with Optuna's own tools (``optuna delete-study``) leaves its row
        # here; it is no study any more, for the pool as for every listing.
        alive = sa.exists().where(studies.c.study_id == hpo_studies.c.study_id)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(hpo_studies, self._now.label("now"))
                .where(where, alive)
                .order_by(hpo_studies.c.study_id)
            ).all()
        return [
            StudyRecord(
                study_id=r.study_id,
                name=r.study_name,
                state=StudyState(r.state),
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


@contextlib.contextmanager
def study_lock(engine: sa.Engine, study_id: int) -> Iterator[sa.Connection | None]:
    """Hold the study's ``hpo_studies`` row locked (PostgreSQL) while the block re-queues or
    enqueues points, so two of them (an operator's ``retry-failed`` and a worker settling a
    failure) never both re-queue one point. Yields the locked connection: a worker's steps
    inside should use it, since a full server may refuse a second one. The block may idle
    the lock's transaction for up to a minute. SQLite: no lock (one host), None."""
    if engine.dialect.name != "postgresql":
        yield None
        return
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL idle_in_transaction_session_timeout = '60s'"))
        conn.execute(sa.text("SET LOCAL lock_timeout = '60s'"))
        conn.execute(
            sa.select(hpo_studies.c.study_id)
            .where(hpo_studies.c.study_id == study_id)
            .with_for_update()
        )
        yield conn
