"""One process's way into the database: Optuna's storage and hpo's tables, behind one object.

A worker (or ``run_hpo``) opens its storage once and wraps it in a ``Backend``; everything that
serves a study, settles a trial or recovers a lost one gets this object, not a storage, a
registry and a ticket table handed around separately. A patient backend's steps wait out an
outage (``database.retried``); a CLI command's fails at once and says so.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo_framework.storage.database import retried
from hpo_framework.storage.optuna_tables import insert_study_attr_once, trial_with_system_attr
from hpo_framework.storage.registry import Registry, study_lock
from hpo_framework.storage.tickets import Tickets
from hpo_framework.storage.trial_attrs import ERROR_ATTR, REQUEUED_FROM_ATTR
from hpo_framework.storage.trial_store import TrialStore, create_trial_once


class Backend:
    """Optuna's ``RDBStorage``, ``hpo_studies`` and ``hpo_tickets`` over one engine."""

    def __init__(self, storage: optuna.storages.RDBStorage, *, patient: bool = True) -> None:
        self.storage = storage
        self.engine = storage.engine
        self.patient = patient
        self.registry = Registry(self.engine, patient=patient)
        self.tickets = Tickets(self.engine, patient=patient)

    def trial_store(self) -> TrialStore:
        """A study's trial cache for this process (one per study it serves)."""
        return TrialStore(self.storage)

    @retried("reading a trial")
    def trial(self, trial_id: int) -> FrozenTrial | None:
        """The trial as the database has it; None if it was deleted with its study."""
        try:
            return self.storage.get_trial(trial_id)
        except KeyError:
            return None

    @retried("failing a lost trial")
    def fail_trial(self, trial_id: int, error: str) -> bool:
        """RUNNING -> FAIL with ``error``, under Optuna's row lock; False if it had finished
        (or a try of ours whose answer was lost did it first, or its study was deleted)."""
        try:
            self.storage.set_trial_user_attr(trial_id, ERROR_ATTR, error)
            return self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
            return False

    @retried("re-queueing a failed trial")
    def requeue(self, study_id: int, failed_trial_id: int, retry: FrozenTrial) -> None:
        """Add ``retry`` (a WAITING trial) for the failed trial, unless one was added already:
        by an earlier try whose answer was lost, a settler before us or ``retry-failed``.
        One connection, the study's lock's: a full server may refuse a second one, and a
        hundred sweepers each holding one and waiting for another stall for good."""
        with study_lock(self.engine, study_id) as conn:
            if trial_with_system_attr(conn or self.engine, REQUEUED_FROM_ATTR, failed_trial_id):
                return
            create_trial_once(self.storage, study_id, retry, conn)

    @retried("recording a study attribute")
    def set_study_attr(self, study_id: int, key: str, value: Any) -> None:
        self.storage.set_study_user_attr(study_id, key, value)

    @retried("recording a study attribute")
    def set_study_attr_once(self, study_id: int, key: str, value: Any) -> bool:
        """Set ``key`` unless it is set; False if it was (another process was first)."""
        return insert_study_attr_once(self.engine, study_id, key, value)
