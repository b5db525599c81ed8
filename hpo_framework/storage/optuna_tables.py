"""The few columns of Optuna's own tables that the framework reads (and, to pop a waiting
trial atomically with its ticket, writes) directly.

Optuna owns and versions this schema; reading it here replaces several queries through
Optuna's trial cache with one indexed query where the pool asks the same thing every trial.
"""

from __future__ import annotations

import json

import optuna
import sqlalchemy as sa
from optuna.storages._rdb import models
from optuna.trial import TrialState

# Optuna's own table definitions: their columns carry Optuna's types (the ``trialstate``
# enum on PostgreSQL), which psycopg 3 needs to compare a state with a parameter.
trials = models.TrialModel.__table__
trial_params = models.TrialParamModel.__table__
trial_values = models.TrialValueModel.__table__
trial_user_attrs = models.TrialUserAttributeModel.__table__
trial_system_attrs = models.TrialSystemAttributeModel.__table__
studies = models.StudyModel.__table__
study_user_attrs = models.StudyUserAttributeModel.__table__


def has_waiting_trials(storage: optuna.storages.RDBStorage, study_id: int) -> bool:
    """Whether the study has a WAITING trial (an enqueued point or a retry) to pop."""
    query = (
        sa.select(trials.c.trial_id)
        .where(trials.c.study_id == study_id, trials.c.state == TrialState.WAITING)
        .limit(1)
    )
    with storage.engine.connect() as conn:
        return conn.execute(query).first() is not None


def trial_with_system_attr(
    bind: sa.Engine | sa.Connection, key: str, value: object, *, running: bool = False
) -> int | None:
    """The id of a trial carrying the system attribute ``key`` = ``value`` (and still
    RUNNING, if ``running``), if any."""
    a = trial_system_attrs.c
    query = sa.select(a.trial_id).where(a.key == key, a.value_json == json.dumps(value))
    if running:
        query = query.join(trials, trials.c.trial_id == a.trial_id).where(
            trials.c.state == TrialState.RUNNING
        )
    query = query.limit(1)
    if isinstance(bind, sa.Connection):
        found = bind.execute(query).scalar()
    else:
        with bind.connect() as conn:
            found = conn.execute(query).scalar()
    return None if found is None else int(found)


def insert_study_attr_once(engine: sa.Engine, study_id: int, key: str, value: object) -> bool:
    """Insert the study's user attribute ``key``; False if some process inserted it first.
    Optuna's unique (study, key) makes this a lock: one winner among all processes."""
    try:
        with engine.begin() as conn:
            conn.execute(
                study_user_attrs.insert().values(
                    study_id=study_id, key=key, value_json=json.dumps(value)
                )
            )
    except sa.exc.IntegrityError:
        return False
    return True
