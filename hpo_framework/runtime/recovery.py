"""Recovering what lost workers held: tickets gone silent, and trials made on lost tickets.

Every live process sweeps (``Sweeper.sweep``, at most once per interval), for every study in
the database whatever its state. A ticket is judged lost only on evidence: it has been silent
(by the database's clock) for longer than its grace period, *and* this process has itself
reached the database without a failure for at least that long. A silence that may have been
the database's own outage is no evidence: after an outage, live workers beat again before
anyone judges them.

Taking a ticket over is one conditional update (one winner); the winner then holds the ticket
like its claimer did (its heartbeat keeps it), fails the trial if still running, settles it,
and if the winner is lost too, another worker takes over and finishes the same idempotent
steps.
"""

from __future__ import annotations

import logging
import time

from optuna.trial import TrialState

from hpo_framework.config.schema import Config
from hpo_framework.runtime.hooks import fire_if_ended, hooks_of
from hpo_framework.runtime.settle import Ledger, settle_failure
from hpo_framework.storage.backend import Backend
from hpo_framework.storage.database import DB_HEALTH
from hpo_framework.storage.registry import StudyRecord
from hpo_framework.storage.tickets import StaleTicket

log = logging.getLogger("hpo.trial")


class Sweeper:
    """One process's recovery of lost workers' tickets."""

    def __init__(self, backend: Backend, worker_id: str, interval: float) -> None:
        self.backend = backend
        self.worker_id = worker_id
        self.interval = interval
        self.ledgers: dict[int, Ledger] = {}  # of the studies this process serves
        self._next = 0.0

    def sweep(self) -> int:
        """Recover every lost ticket this process may judge; at most once per interval.
        Returns how many tickets it recovered."""
        now = time.monotonic()
        if now < self._next:
            return 0
        self._next = now + self.interval
        recovered = 0
        tickets = self.backend.tickets
        stale = tickets.stale()
        connected = DB_HEALTH.connected_for()
        for ticket in stale:
            if connected < ticket.grace:
                continue  # this process may have been cut off itself: no evidence yet
            if tickets.take_over(ticket.ticket_id, self.worker_id):
                self._recover(ticket)
                recovered += 1
        for trial_id in tickets.orphans():
            self.backend.fail_trial(trial_id, "its ticket was recovered before the trial began")
        return recovered

    def _recover(self, ticket: StaleTicket) -> None:
        me, backend, tickets = self.worker_id, self.backend, self.backend.tickets
        record = backend.registry.by_id(ticket.study_id)
        trial_id = ticket.trial_id
        if trial_id is None:
            trial_id = tickets.trial_of(ticket.ticket_id)
        trial = None if trial_id is None else backend.trial(trial_id)
        if record is None or trial is None:  # lost before its trial began, or study deleted
            tickets.settle(ticket.ticket_id, me, returned=True, failure=False)
            name = record.name if record is not None else f"#{ticket.study_id} (deleted)"
            log.warning(
                "study=%s ticket of worker %s returned: lost before its trial began "
                "(silent %.0fs)", name, ticket.worker, ticket.silent_s,
            )  # fmt: skip
            return
        if trial.state == TrialState.RUNNING:
            error = f"worker {ticket.worker} lost: no heartbeat for over {ticket.grace:g}s"
            if backend.fail_trial(trial._trial_id, error):
                log.warning(
                    "study=%s trial=%d failed: worker %s lost (no heartbeat for %.0fs, grace "
                    "%gs)%s", record.name, trial.number, ticket.worker, ticket.silent_s,
                    ticket.grace, "; params re-queued" if trial.params else "",
                )  # fmt: skip
            trial = backend.trial(trial._trial_id) or trial
        if trial.state == TrialState.FAIL:
            # A trial lost before it had parameters never ran: no failure of the study's.
            ledger = self._ledger(record)
            settle_failure(ledger, trial, ticket.ticket_id, me, failure=bool(trial.params))
        else:  # it finished; its worker was lost before settling: the result counts
            tickets.settle(ticket.ticket_id, me, returned=False, failure=False)
        if hooks_of(record) != (None, None):  # the lost worker's trial may have been the last
            try:
                fire_if_ended(backend, record.study_id)
            except Exception as e:  # a hook never takes the sweeping worker down
                log.warning("study=%s hook not fired: %s", record.name, e)

    def _ledger(self, record: StudyRecord) -> Ledger:
        known = self.ledgers.get(record.study_id)
        if known is not None:
            return known
        try:
            retries = Config.stored(record.name, record.config).study.max_retries
        except Exception:  # a study whose stored config no longer checks: no retries
            retries = 0
        return Ledger(self.backend, record.study_id, record.name, retries)
