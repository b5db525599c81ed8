"""Settling a ticket whose trial failed: its point runs again (within ``max_retries``), *then*
the ticket goes back to the budget. The order is what the exact budget relies on (the next
ticket holder must find the re-queued point), so it lives here and nowhere else.

Both steps are idempotent: the retry carries the failed trial's id, so re-queueing again after
a lost answer (or a recoverer finishing what a lost settler began) finds it and adds nothing;
the ticket is settled by one conditional statement (``Tickets.settle``). The retry policy
(whether a point runs again) is ``retries_left``; the mechanism is the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo_framework.storage.backend import Backend
from hpo_framework.storage.registry import OPEN, PAUSED, StudyRecord
from hpo_framework.storage.trial_attrs import (
    ATTEMPT_ATTR,
    REQUEUED_FROM_ATTR,
    RETRY_OF_ATTR,
    int_attr,
)

log = logging.getLogger("hpo.trial")


@dataclass(frozen=True)
class Ledger:
    """What settling needs to know of a study, whether this process serves it or not."""

    backend: Backend
    study_id: int
    name: str
    max_retries: int


def settle_failure(
    ledger: Ledger, failed: FrozenTrial, ticket_id: int, worker: str, *, failure: bool = True
) -> None:
    """Re-queue the failed trial's point (once), then give its ticket back."""
    requeue_once(ledger, failed)
    state = ledger.backend.tickets.settle(ticket_id, worker, returned=True, failure=failure)
    if state is not None and state != OPEN:
        log.error("study=%s stopped: %s", ledger.name, "max_failed_trials reached")


def requeue_once(ledger: Ledger, failed: FrozenTrial) -> None:
    """Enqueue the failed trial's parameters again, unless retries are used up, the study
    does not go on, or this failed trial was re-queued already."""
    attempt = int_attr(failed.user_attrs, ATTEMPT_ATTR, 0)
    params = failed.params or failed.system_attrs.get("fixed_params") or {}
    if not params:
        return
    record = ledger.backend.registry.by_id(ledger.study_id)
    if record is None or not retries_left(record, attempt, ledger.max_retries):
        return
    root = failed.user_attrs.get(RETRY_OF_ATTR, failed.number)
    retry = optuna.trial.create_trial(
        state=TrialState.WAITING,
        system_attrs={"fixed_params": dict(params), REQUEUED_FROM_ATTR: failed._trial_id},
        user_attrs={RETRY_OF_ATTR: root, ATTEMPT_ATTR: attempt + 1},
    )
    ledger.backend.requeue(ledger.study_id, failed._trial_id, retry)


def retries_left(record: StudyRecord, attempt: int, max_retries: int) -> bool:
    """The retry policy: whether a point whose ``attempt``-th try failed runs again. Not if
    the study does not go on after one more failure (its point would be left WAITING), nor
    past ``max_retries`` (the live study's value wins: ``hpo-coordinator set`` may change it).
    A paused study goes on when resumed."""
    limit = record.max_failures
    goes_on = record.state in (OPEN, PAUSED) and (limit is None or record.failures + 1 < limit)
    live = int_attr(record.config.get("study") or {}, "max_retries", max_retries)
    return goes_on and attempt < live
