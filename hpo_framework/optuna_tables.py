"""The few columns of Optuna's own tables that the framework reads directly, and its queries.

Optuna owns and versions this schema; reading it here replaces several queries through
Optuna's trial cache with one indexed query where the pool asks the same thing every trial.
"""

from __future__ import annotations

import optuna
import sqlalchemy as sa

_trials = sa.table(
    "trials", sa.column("trial_id"), sa.column("number"), sa.column("study_id"), sa.column("state")
)
_heartbeats = sa.table(
    "trial_heartbeats", sa.column("trial_id"), sa.column("heartbeat", sa.DateTime)
)


def stale_trial_ids(storage: optuna.storages.RDBStorage, study_id: int, grace: float) -> list[int]:
    """Running trials of the study whose last heartbeat is older than ``grace`` seconds.

    The database's current time is read in the same query as the heartbeats it is compared to.
    Heartbeats are naive timestamps in the database session's time zone, as Optuna stores them.
    """
    now = sa.func.current_timestamp().label("now")
    query = (
        sa.select(_trials.c.trial_id, _heartbeats.c.heartbeat, sa.type_coerce(now, sa.DateTime))
        .join(_heartbeats, _heartbeats.c.trial_id == _trials.c.trial_id)
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
