"""Settling a ticket whose trial failed: its point runs again (within ``max_retries``), *then*
the ticket goes back to the budget. The order is what the exact budget relies on (the next
ticket holder must find the re-queued point), so it lives here and nowhere else.

Both steps are idempotent: the retry carries the failed trial's id, so re-queueing again after
a lost answer (or a recoverer finishing what a lost settler began) finds it and adds nothing;
the ticket is settled by one conditional statement (``Tickets.settle``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo_framework.storage.database import with_db_retry
from hpo_framework.storage.optuna_tables import trial_with_system_attr
from hpo_framework.storage.registry import OPEN, PAUSED, Registry, StudyRecord, study_lock
from hpo_framework.storage.tickets import Tickets
from hpo_framework.storage.trial_attrs import (
    ATTEMPT_ATTR,
    REQUEUED_FROM_ATTR,
    RETRY_OF_ATTR,
    int_attr,
)
from hpo_framework.storage.trial_store import create_trial_once

log = logging.getLogger("hpo.trial")


@dataclass(frozen=True)
class Ledger:
    """What settling needs to know of a study, whether this process serves it or not."""

    storage: optuna.storages.RDBStorage
    registry: Registry
    tickets: Tickets
    study_id: int
    name: str
    max_retries: int


def settle_failure(
    ledger: Ledger, failed: FrozenTrial, ticket_id: int, worker: str, *, failure: bool = True
) -> None:
    """Re-queue the failed trial's point (once), then give its ticket back."""
    requeue_once(ledger, failed)
    state = with_db_retry(
        lambda: ledger.tickets.settle(ticket_id, worker, returned=True, failure=failure),
        "returning a ticket",
    )
    if state is not None and state != OPEN:
        log.error("study=%s stopped: %s", ledger.name, "max_failed_trials reached")


def requeue_once(ledger: Ledger, failed: FrozenTrial) -> None:
    """Enqueue the failed trial's parameters again, unless retries are used up, the study
    does not go on, or this failed trial was re-queued already."""
    attempt = int_attr(failed.user_attrs, ATTEMPT_ATTR, 0)
    params = failed.params or failed.system_attrs.get("fixed_params") or {}
    if not params:
        return
    record = with_db_retry(lambda: ledger.registry.by_id(ledger.study_id), "reading")
    if record is None or not _goes_on(record):
        return
    # max_retries may have been changed on the live study (hpo-coordinator set)
    max_retries = int_attr(record.config.get("study") or {}, "max_retries", ledger.max_retries)
    if attempt >= max_retries:
        return
    root = failed.user_attrs.get(RETRY_OF_ATTR, failed.number)
    retry = optuna.trial.create_trial(
        state=TrialState.WAITING,
        system_attrs={"fixed_params": dict(params), REQUEUED_FROM_ATTR: failed._trial_id},
        user_attrs={RETRY_OF_ATTR: root, ATTEMPT_ATTR: attempt + 1},
    )

    def requeue() -> None:
        engine = ledger.storage.engine
        # retry-failed may be at it too. One connection: a full server may refuse a second
        # one, and a hundred sweepers each holding one and waiting for another stall for good.
        with study_lock(engine, ledger.study_id) as conn:
            if trial_with_system_attr(conn or engine, REQUEUED_FROM_ATTR, failed._trial_id):
                return  # an earlier try committed (its answer was lost), or a settler before us
            create_trial_once(ledger.storage, ledger.study_id, retry, conn)

    with_db_retry(requeue, "re-queueing a failed trial")


def _goes_on(record: StudyRecord) -> bool:
    """Whether the study goes on after one more failure (no retry for a study that this
    failure stops: its point would be left WAITING). A paused study goes on when resumed."""
    limit = record.max_failures
    return record.state in (OPEN, PAUSED) and (limit is None or record.failures + 1 < limit)
