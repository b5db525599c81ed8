"""Settling a failed trial: its point runs again (within ``max_retries``), *then* its ticket
goes back to the budget. The order is what the exact budget relies on: the next ticket holder
must find the re-queued point, so it lives here and nowhere else."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from optuna.trial import FrozenTrial

from hpo_framework.registry import OPEN
from hpo_framework.storage import with_db_retry
from hpo_framework.trial_attrs import ATTEMPT_ATTR, RETRY_OF_ATTR

if TYPE_CHECKING:
    from hpo_framework.trials import StudyHandle

log = logging.getLogger("hpo.trial")


def settle_failure(handle: StudyHandle, failed: FrozenTrial, *, ticket: bool = True) -> None:
    """A failed trial's parameters run again (up to max_retries), its ticket is returned.

    The point is enqueued before the ticket goes back, so the next ticket holder finds it.
    ``ticket=False`` for a trial whose ticket was already handed back with its lease.
    """
    attempt = int(failed.user_attrs.get(ATTEMPT_ATTR, 0))
    params = failed.params or failed.system_attrs.get("fixed_params") or {}
    if params and attempt < handle.config.study.max_retries and _goes_on(handle):
        root = failed.user_attrs.get(RETRY_OF_ATTR, failed.number)
        with_db_retry(
            lambda: handle.study.enqueue_trial(
                params, user_attrs={RETRY_OF_ATTR: root, ATTEMPT_ATTR: attempt + 1}
            ),
            "re-queueing a failed trial",
        )
    if not ticket:
        return
    state = with_db_retry(
        lambda: handle.registry.return_ticket(handle.record.study_id, failed=True),
        "returning a ticket",
    )
    if state != OPEN:
        log.error("study=%s stopped: %s", handle.name, "max_failed_trials reached")


def _goes_on(handle: StudyHandle) -> bool:
    """Whether the study stays open after one more failure (no retry for a study that
    this failure stops: its point would be left WAITING)."""
    record = with_db_retry(lambda: handle.registry.get(handle.name), "reading")
    limit = record.max_failures
    return record.state == OPEN and (limit is None or record.failures + 1 < limit)
