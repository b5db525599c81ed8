"""The few columns of Optuna's own tables that the framework reads (and, to pop a waiting
trial atomically with its ticket, writes) directly.

Optuna owns and versions this schema; reading it here replaces several queries through
Optuna's trial cache with one indexed query where the pool asks the same thing every trial.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial

trials = sa.table(
    "trials",
    sa.column("trial_id"),
    sa.column("number"),
    sa.column("study_id"),
    sa.column("state"),
    sa.column("datetime_start", sa.DateTime),
)
trial_user_attrs = sa.table(
    "trial_user_attributes", sa.column("trial_id"), sa.column("key"), sa.column("value_json")
)
trial_system_attrs = sa.table(
    "trial_system_attributes", sa.column("trial_id"), sa.column("key"), sa.column("value_json")
)
studies = sa.table("studies", sa.column("study_id"))


def has_waiting_trials(storage: optuna.storages.RDBStorage, study_id: int) -> bool:
    """Whether the study has a WAITING trial (an enqueued point or a retry) to pop."""
    query = (
        sa.select(trials.c.trial_id)
        .where(trials.c.study_id == study_id, trials.c.state == "WAITING")
        .limit(1)
    )
    with storage.engine.connect() as conn:
        return conn.execute(query).first() is not None


def trial_with_system_attr(engine: sa.Engine, key: str, value: object) -> int | None:
    """The id of a trial carrying the system attribute ``key`` = ``value``, if any."""
    a = trial_system_attrs.c
    query = sa.select(a.trial_id).where(a.key == key, a.value_json == json.dumps(value)).limit(1)
    with engine.connect() as conn:
        found = conn.execute(query).scalar()
    return None if found is None else int(found)


def create_trial_once(
    storage: optuna.storages.BaseStorage, study_id: int, template: FrozenTrial
) -> int:
    """Optuna's ``create_new_trial``, tried once.

    Optuna's own retries trial creation after any database error, including a COMMIT whose
    answer was lost after the server had committed: the trial then exists twice (a re-queued
    point evaluated twice, a trial left running forever). The callers here retry with
    ``with_db_retry`` and first look for the trial an earlier try made, by a system attribute
    unique to it. This reuses Optuna's private steps of that method (pinned by the lost-answer
    tests of ``tests/test_faults.py``); through a ``_CachedStorage`` the trial is also cached,
    as Optuna's method does, so that the study's sampler may set its parameters.
    """
    cached = storage if isinstance(storage, _CachedStorage) else None
    backend = cached._backend if cached is not None else storage
    assert isinstance(backend, optuna.storages.RDBStorage)
    with _create_scoped_session(backend.scoped_session) as session:
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        row: Any = backend._get_prepared_new_trial(study_id, template, session)
        frozen = copy.deepcopy(template)
        frozen.number, frozen.datetime_start = row.number, row.datetime_start
        frozen._trial_id = row.trial_id
    if cached is not None:
        remember(cached, study_id, frozen)
    return int(frozen._trial_id)


def remember(storage: optuna.storages.BaseStorage, study_id: int, trial: FrozenTrial) -> None:
    """Put a trial this process made, or found made by a lost try of its own, in Optuna's
    per-study cache (what ``_CachedStorage.create_new_trial`` does)."""
    if not isinstance(storage, _CachedStorage):
        return
    with storage._lock:
        if study_id not in storage._studies:
            storage._studies[study_id] = _StudyInfo()
        storage._add_trials_to_cache(study_id, [trial])
