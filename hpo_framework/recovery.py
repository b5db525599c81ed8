"""Recovering the trials of dead workers: stale heartbeats, leases never covered, orphans.

Any live worker sweeps (at most once per heartbeat interval per study); a conditional
RUNNING -> FAIL update decides which one wins a trial, and the winner settles it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from hpo_framework import defaults
from hpo_framework.optuna_tables import orphan_trial_ids, stale_trial_ids
from hpo_framework.settle import settle_failure
from hpo_framework.storage import with_db_retry
from hpo_framework.trial_attrs import ERROR_ATTR, WORKER_ATTR

if TYPE_CHECKING:
    from hpo_framework.trials import StudyHandle

log = logging.getLogger("hpo.trial")


def sweep_stale(handle: StudyHandle) -> int:
    """Fail trials whose heartbeat stopped and re-run their parameters; at most once per
    heartbeat interval. Returns how many trials this process failed."""
    now = time.monotonic()
    if now < handle.next_sweep:
        return 0
    handle.next_sweep = now + handle.config.study.heartbeat_interval
    grace = handle.config.study.grace_period
    failed = 0
    ids = with_db_retry(
        lambda: stale_trial_ids(handle.storage, handle.record.study_id, grace), "sweeping"
    )
    for trial_id in ids:
        if _fail_stale(handle, trial_id, grace):
            failed += 1
    # Workers that died between claiming a ticket and covering their trial.
    study_id = handle.record.study_id
    lease_timeout = max(grace, defaults.LEASE_TIMEOUT_S)
    for worker in with_db_retry(
        lambda: handle.registry.reclaim_leases(study_id, lease_timeout), "reclaiming tickets"
    ):
        log.warning(
            "study=%s ticket of worker %s reclaimed: no trial after %gs",
            handle.name, worker, lease_timeout,
        )  # fmt: skip
    orphans = with_db_retry(
        lambda: orphan_trial_ids(handle.storage, study_id, grace + defaults.CLOCK_SKEW_S),
        "sweeping",
    )
    for trial_id in orphans:
        if fail_uncovered(handle, trial_id, "its worker was lost before the first heartbeat"):
            failed += 1
    return failed


def fail_uncovered(handle: StudyHandle, trial_id: int, reason: str) -> bool:
    """Fail a trial that never got a heartbeat; its ticket went back with its lease."""
    won = with_db_retry(lambda: _win_stale(handle, trial_id, reason), "failing a trial")
    if won:
        trial = with_db_retry(lambda: handle.storage.get_trial(trial_id), "reading a trial")
        log.warning("study=%s trial=%d failed: %s", handle.name, trial.number, reason)
        settle_failure(handle, trial, ticket=False)
    return won


def _fail_stale(handle: StudyHandle, trial_id: int, grace: float) -> bool:
    trial = with_db_retry(lambda: handle.storage.get_trial(trial_id), "reading a stale trial")
    lost = trial.user_attrs.get(WORKER_ATTR, "unknown")
    error = f"worker {lost} lost: no heartbeat for over {grace:g}s"
    if not with_db_retry(lambda: _win_stale(handle, trial_id, error), "failing a stale trial"):
        return False
    log.warning(
        "study=%s trial=%d failed: worker %s lost (no heartbeat for %gs); params re-queued",
        handle.name, trial.number, lost, grace,
    )  # fmt: skip
    # Each step from here retries on its own: once this worker has won the trial, its
    # ticket must go back even if the database drops in between.
    failed = with_db_retry(lambda: handle.storage.get_trial(trial_id), "reading a stale trial")
    settle_failure(handle, failed)
    return True


def _win_stale(handle: StudyHandle, trial_id: int, error: str) -> bool:
    try:
        handle.storage.set_trial_user_attr(trial_id, ERROR_ATTR, error)
        # Conditional RUNNING -> FAIL under a row lock: one live worker wins the trial.
        return handle.storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # it finished after all, or another worker failed it first
