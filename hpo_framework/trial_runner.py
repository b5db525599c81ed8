"""One study as a process serves it, and the life of one trial: ticket, sample, session, result.

This is the whole data path of a trial::

    ticket (registry) -> trial row (waiting point or new) -> heartbeat -> params (param_sampler)
    -> cfg = static + params -> session(cfg) -> checked score -> tell -> on failure: retry

Both ``run_hpo`` (one process) and ``hpo-worker`` (many) run trials through ``StudyHandle``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo_framework import defaults
from hpo_framework.config import Config
from hpo_framework.exceptions import TrialLost, TrialPruned
from hpo_framework.executor import InProcessExecutor, ProcessExecutor, describe_error
from hpo_framework.heartbeat import Heartbeat
from hpo_framework.optuna_tables import has_waiting_trials, orphan_trial_ids, stale_trial_ids
from hpo_framework.param_sampler import merge
from hpo_framework.registry import OPEN, Registry, StudyRecord
from hpo_framework.samplers import build_pruner, build_sampler, worker_seed
from hpo_framework.storage import with_db_retry
from hpo_framework.trial_attrs import ATTEMPT_ATTR, ERROR_ATTR, RETRY_OF_ATTR, WORKER_ATTR

log = logging.getLogger("hpo.trial")


class ColdShutdown(BaseException):
    """Raised in the main thread by a worker's second SIGTERM/SIGINT to abandon the trial now.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` can swallow it.
    """


class OptunaLink:
    """``report`` on an Optuna trial of this process, with the database retried."""

    def __init__(self, trial: optuna.Trial, n_objectives: int) -> None:
        self.trial = trial
        self.n_objectives = n_objectives

    def report(self, value: float, step: int) -> None:
        trial = self.trial
        if self.n_objectives > 1:
            return
        try:
            with_db_retry(lambda: trial.report(value, step), "reporting a step")
        except optuna.exceptions.UpdateFinishedTrialError:
            raise TrialLost(f"trial {trial.number} was failed by another worker") from None
        if with_db_retry(trial.should_prune, "asking the pruner"):
            raise TrialPruned(f"trial {trial.number} pruned at step {step} (value {value:g})")


@dataclass(frozen=True)
class TrialOutcome:
    study: str
    number: int
    state: TrialState
    values: list[float] | None
    duration_s: float
    error: str | None = None
    #: The session broke the study's contract (wrong number of values): stop the study.
    fatal: bool = False


class StudyHandle:
    """A study loaded in this process: its checked config, session, sampler and Optuna study."""

    def __init__(
        self,
        storage: optuna.storages.RDBStorage,
        record: StudyRecord,
        config: Config,
        executor: InProcessExecutor | ProcessExecutor,
        *,
        worker_id: str,
        worker_index: int = 0,
    ) -> None:
        self.storage = storage
        self.registry = Registry(storage.engine)
        self.record = record
        self.config = config
        self.executor = executor
        self.worker_id = worker_id
        spec = config.study
        sampler = build_sampler(
            spec.sampler.name,
            worker_seed(spec.sampler.seed, worker_index),
            spec.sampler.options,
            config.search_space,
            config.source,
        )
        pruner = build_pruner(spec.pruner.name, spec.pruner.options)
        # One Study object per study per process: its trial cache makes sampling incremental.
        self.study = with_db_retry(
            lambda: optuna.load_study(
                study_name=record.name, storage=storage, sampler=sampler, pruner=pruner
            ),
            f"loading study {record.name!r}",
        )
        # Optuna's per-study trial cache. Trials must be created and popped through it (as
        # Study.ask does) or it rejects their parameters; there is no public handle on it.
        self._cached_storage = self.study._storage
        self.n_objectives = len(spec.directions)
        self._next_sweep = 0.0

    @property
    def name(self) -> str:
        return self.record.name

    # --- one trial ----------------------------------------------------------------------------

    def run_one(self, heartbeat: Heartbeat) -> TrialOutcome | None:
        """Run one trial if the study has budget left; None when it has none."""
        study_id = self.record.study_id
        lease = with_db_retry(
            lambda: self.registry.claim_ticket(study_id, self.worker_id), "claiming"
        )
        if lease is None:
            return None
        trial_id = with_db_retry(self._start_trial, "starting a trial")
        if not with_db_retry(
            lambda: self.registry.cover_trial(lease, trial_id), "covering a trial"
        ):
            # Frozen past the grace period between claim and trial: the ticket went back.
            self._fail_uncovered(
                trial_id, "its ticket was reclaimed: this worker was unresponsive"
            )
            return None
        heartbeat.track(trial_id, self.config.study.heartbeat_interval)
        try:
            return self._run_trial(trial_id)
        finally:
            heartbeat.untrack()

    def _start_trial(self) -> int:
        """Take a waiting trial (an enqueued point or a retry) if any, else create a new one."""
        storage = self._cached_storage
        # One indexed probe first: reading the trials through Optuna's cache costs several
        # queries, and most trials find nothing waiting.
        waiting_trials = (
            storage.get_all_trials(
                self.record.study_id, deepcopy=False, states=(TrialState.WAITING,)
            )
            if has_waiting_trials(self.storage, self.record.study_id)
            else []
        )
        for waiting in waiting_trials:
            try:
                # Conditional WAITING -> RUNNING: False when another worker popped it first.
                if not storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            storage.set_trial_user_attr(waiting._trial_id, WORKER_ATTR, self.worker_id)
            return waiting._trial_id
        template = optuna.trial.create_trial(state=TrialState.WAITING)
        template.state = TrialState.RUNNING
        template.datetime_start = datetime.now()
        template.user_attrs = {WORKER_ATTR: self.worker_id}
        return storage.create_new_trial(self.record.study_id, template_trial=template)

    def _run_trial(self, trial_id: int) -> TrialOutcome:
        # Like Study.ask: the sampler must see the trials finished since the last one.
        self.study._thread_local.cached_all_trials = None
        trial = with_db_retry(lambda: optuna.Trial(self.study, trial_id), "loading a trial")
        started = time.monotonic()
        try:
            params = with_db_retry(lambda: self.config.search_space.sample(trial), "sampling")
        except Exception as e:  # a sampler that cannot sample this space: this trial fails
            return self._finish(trial, TrialState.FAIL, None, started, describe_error(e))
        cfg = merge(self.config.static, params)
        try:
            result = self.executor.run(
                self.record.session_ref or "", cfg, OptunaLink(trial, self.n_objectives),
                self.n_objectives, self.config.study.trial_timeout,
            )  # fmt: skip
        except ColdShutdown:
            self._finish(
                trial, TrialState.FAIL, None, started, "worker stopped by a second signal"
            )
            raise
        except KeyboardInterrupt:  # run_hpo's Ctrl-C
            self._finish(trial, TrialState.FAIL, None, started, "interrupted (KeyboardInterrupt)")
            raise
        if result.kind == "done":
            return self._finish(trial, TrialState.COMPLETE, result.values, started, None)
        if result.kind == "pruned":
            return self._finish(trial, TrialState.PRUNED, None, started, None)
        if result.kind == "lost":
            return self._dropped(trial, started)
        error = result.error or "session failed"
        if not result.fatal:
            log.warning(
                "study=%s trial=%d session failed: %s%s", self.name, trial.number, error,
                f"\n{result.traceback}" if result.traceback else "",
            )  # fmt: skip
        outcome = self._finish(trial, TrialState.FAIL, None, started, error)
        if result.fatal:
            with_db_retry(lambda: self.registry.set_state(self.name, "failed", error), "stop")
            return TrialOutcome(**{**outcome.__dict__, "fatal": True})
        return outcome

    def _finish(
        self,
        trial: optuna.Trial,
        state: TrialState,
        values: list[float] | None,
        started: float,
        error: str | None,
    ) -> TrialOutcome:
        duration = time.monotonic() - started
        kept = with_db_retry(lambda: self._tell(trial, state, values, error), "saving a result")
        outcome = TrialOutcome(self.name, trial.number, state, values, duration, error)
        if not kept:
            return self._dropped(trial, started)
        if state == TrialState.FAIL:
            failed = with_db_retry(lambda: self.storage.get_trial(trial._trial_id), "reading")
            self._retry(failed)
        value = "-" if values is None else ",".join(f"{v:.6g}" for v in values)
        fields = {
            "study": self.name, "trial": trial.number, "state": state.name, "values": values,
            "duration_s": round(duration, 3), "worker": self.worker_id, "error": error,
        }  # fmt: skip
        log.info(
            "study=%s trial=%d state=%s value=%s duration=%.2fs worker=%s%s",
            self.name, trial.number, state.name, value, duration, self.worker_id,
            f" error={error}" if error else "", extra={"hpo": fields},
        )  # fmt: skip
        return outcome

    def _dropped(self, trial: optuna.Trial, started: float) -> TrialOutcome:
        log.warning(
            "study=%s trial=%d result dropped: the trial was failed as stale and retried "
            "elsewhere while this worker was unresponsive", self.name, trial.number,
        )  # fmt: skip
        duration = time.monotonic() - started
        return TrialOutcome(self.name, trial.number, TrialState.FAIL, None, duration, "lost")

    def _tell(
        self, trial: optuna.Trial, state: TrialState, values: list[float] | None, error: str | None
    ) -> bool:
        """Record the result; False if the trial had been finished by someone else (stale)."""
        try:
            if error is not None:
                self.storage.set_trial_user_attr(trial._trial_id, ERROR_ATTR, error[:2000])
            try:
                self.study.tell(trial, values, state=state)
            except RuntimeError as e:
                # GridSampler calls Study.stop() once the grid is covered, which Optuna only
                # allows inside study.optimize; the result is stored before it raises, and the
                # budget (capped at the grid size) already ends the study.
                if "Study.stop" not in str(e):
                    raise
            return True
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            # Either our own earlier try committed before the connection dropped, or a live
            # worker failed this trial because our heartbeat stopped (e.g. SIGSTOP).
            stored = self.storage.get_trial(trial._trial_id)
            if stored.state != state:
                return False
            if state == TrialState.FAIL:  # the stale sweep writes its own error
                return stored.user_attrs.get(ERROR_ATTR) == (error or "")[:2000]
            return values is None or stored.values == values

    def _retry(self, failed: FrozenTrial, *, ticket: bool = True) -> None:
        """A failed trial's parameters run again (up to max_retries), its ticket is returned.

        The point is enqueued before the ticket goes back, so the next ticket holder finds it.
        ``ticket=False`` for a trial whose ticket was already handed back with its lease.
        """
        attempt = int(failed.user_attrs.get(ATTEMPT_ATTR, 0))
        params = failed.params or failed.system_attrs.get("fixed_params") or {}
        if params and attempt < self.config.study.max_retries and self._goes_on():
            root = failed.user_attrs.get(RETRY_OF_ATTR, failed.number)
            with_db_retry(
                lambda: self.study.enqueue_trial(
                    params, user_attrs={RETRY_OF_ATTR: root, ATTEMPT_ATTR: attempt + 1}
                ),
                "re-queueing a failed trial",
            )
        if not ticket:
            return
        state = with_db_retry(
            lambda: self.registry.return_ticket(self.record.study_id, failed=True),
            "returning a ticket",
        )
        if state != OPEN:
            log.error("study=%s stopped: %s", self.name, "max_failed_trials reached")

    def _goes_on(self) -> bool:
        """Whether the study stays open after one more failure (no retry for a study that
        this failure stops: its point would be left WAITING)."""
        record = with_db_retry(lambda: self.registry.get(self.name), "reading")
        limit = record.max_failures
        return record.state == OPEN and (limit is None or record.failures + 1 < limit)

    # --- trials of dead workers ---------------------------------------------------------------

    def sweep_stale(self) -> int:
        """Fail trials whose heartbeat stopped and re-run their parameters; at most once per
        heartbeat interval. Returns how many trials this process failed."""
        now = time.monotonic()
        if now < self._next_sweep:
            return 0
        self._next_sweep = now + self.config.study.heartbeat_interval
        grace = self.config.study.grace_period
        failed = 0
        ids = with_db_retry(
            lambda: stale_trial_ids(self.storage, self.record.study_id, grace), "sweeping"
        )
        for trial_id in ids:
            if self._fail_stale(trial_id, grace):
                failed += 1
        # Workers that died between claiming a ticket and covering their trial.
        study_id = self.record.study_id
        lease_timeout = max(grace, defaults.LEASE_TIMEOUT_S)
        for worker in with_db_retry(
            lambda: self.registry.reclaim_leases(study_id, lease_timeout), "reclaiming tickets"
        ):
            log.warning(
                "study=%s ticket of worker %s reclaimed: no trial after %gs",
                self.name, worker, lease_timeout,
            )  # fmt: skip
        orphans = with_db_retry(
            lambda: orphan_trial_ids(self.storage, study_id, grace + defaults.CLOCK_SKEW_S),
            "sweeping",
        )
        for trial_id in orphans:
            if self._fail_uncovered(trial_id, "its worker was lost before the first heartbeat"):
                failed += 1
        return failed

    def _fail_uncovered(self, trial_id: int, reason: str) -> bool:
        """Fail a trial that never got a heartbeat; its ticket went back with its lease."""
        won = with_db_retry(lambda: self._win_stale(trial_id, reason), "failing a trial")
        if won:
            trial = with_db_retry(lambda: self.storage.get_trial(trial_id), "reading a trial")
            log.warning("study=%s trial=%d failed: %s", self.name, trial.number, reason)
            self._retry(trial, ticket=False)
        return won

    def _fail_stale(self, trial_id: int, grace: float) -> bool:
        trial = with_db_retry(lambda: self.storage.get_trial(trial_id), "reading a stale trial")
        lost = trial.user_attrs.get(WORKER_ATTR, "unknown")
        error = f"worker {lost} lost: no heartbeat for over {grace:g}s"
        if not with_db_retry(lambda: self._win_stale(trial_id, error), "failing a stale trial"):
            return False
        log.warning(
            "study=%s trial=%d failed: worker %s lost (no heartbeat for %gs); params re-queued",
            self.name, trial.number, lost, grace,
        )  # fmt: skip
        # Each step from here retries on its own: once this worker has won the trial, its
        # ticket must go back even if the database drops in between.
        failed = with_db_retry(lambda: self.storage.get_trial(trial_id), "reading a stale trial")
        self._retry(failed)
        return True

    def _win_stale(self, trial_id: int, error: str) -> bool:
        try:
            self.storage.set_trial_user_attr(trial_id, ERROR_ATTR, error)
            # Conditional RUNNING -> FAIL under a row lock: one live worker wins the trial.
            return self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False  # it finished after all, or another worker failed it first


def load_config_of(record: StudyRecord) -> Config:
    """The stored config of a study, checked again: workers trust nothing from the database."""
    return Config.from_mapping(record.config, f"study {record.name!r} (stored config)")
