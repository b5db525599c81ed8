"""The few columns of Optuna's own tables that the framework reads directly, and its queries.

Optuna owns and versions this schema; reading it here replaces several queries through
Optuna's trial cache with one indexed query where the pool asks the same thing every trial.
"""

from __future__ import annotations

from typing import Any

import optuna
import sqlalchemy as sa

_trials = sa.table(
    "trials",
    sa.column("trial_id"),
    sa.column("number"),
    sa.column("study_id"),
    sa.column("state"),
    sa.column("datetime_start", sa.DateTime),
)
heartbeats = sa.table(
    "trial_heartbeats", sa.column("trial_id"), sa.column("heartbeat", sa.DateTime)
)


def stale_trial_ids(storage: optuna.storages.RDBStorage, study_id: int, grace: float) -> list[int]:
    """Running trials of the study whose last heartbeat is older than ``grace`` seconds.

    The database's current time is read in the same query as the heartbeats it is compared to.
    Heartbeats are naive timestamps in the database session's time zone, as Optuna stores them.
    """
    now = sa.func.current_timestamp().label("now")
    query = (
        sa.select(_trials.c.trial_id, heartbeats.c.heartbeat, sa.type_coerce(now, sa.DateTime))
        .join(heartbeats, heartbeats.c.trial_id == _trials.c.trial_id)
        .where(_trials.c.study_id == study_id, _trials.c.state == "RUNNING")
    )
    with storage.engine.connect() as conn:
        rows = conn.execute(query).all()
    stale = []
    for trial_id, beat, current in rows:
        if (current.replace(tzinfo=None) - beat.replace(tzinfo=None)).total_seconds() > grace:
            stale.append(int(trial_id))
    return stale


def has_waiting_trials(storage: optuna.storages.RDBStorage, study_id: int) -> bool:
    """Whether the study has a WAITING trial (an enqueued point or a retry) to pop."""
    query = (
        sa.select(_trials.c.trial_id)
        .where(_trials.c.study_id == study_id, _trials.c.state == "WAITING")
        .limit(1)
    )
    with storage.engine.connect() as conn:
        return conn.execute(query).first() is not None


def orphan_trial_ids(
    storage: optuna.storages.RDBStorage, study_id: int, older_than: float
) -> list[int]:
    """RUNNING trials that never got a heartbeat, started over ``older_than`` seconds ago.

    Their worker died between creating the trial row and covering it (its lease, and so its
    ticket, is reclaimed separately). Start times are Optuna's naive UTC, from the worker's
    clock, so ``older_than`` should allow for clock skew.
    """
    has_beat = sa.exists().where(heartbeats.c.trial_id == _trials.c.trial_id)
    query = sa.select(
        _trials.c.trial_id,
        _trials.c.datetime_start,
        sa.type_coerce(_utc_now(storage), sa.DateTime),
    ).where(_trials.c.study_id == study_id, _trials.c.state == "RUNNING", ~has_beat)
    with storage.engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        int(trial_id)
        for trial_id, started, now in rows
        if started is not None
        and (now.replace(tzinfo=None) - started).total_seconds() > older_than
    ]


def _utc_now(storage: optuna.storages.RDBStorage) -> sa.ColumnElement[Any]:
    if storage.engine.dialect.name == "postgresql":
        return sa.literal_column("(now() at time zone 'utc')")
    return sa.func.current_timestamp()  # SQLite's is UTC
