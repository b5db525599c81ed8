"""One study as a process serves it, and the life of one trial: ticket, sample, session, result.

This is the whole data path of a trial::

    ticket (tickets; heartbeat from here) -> trial row (waiting point or new, bound to the
    ticket) -> params (param_sampler) -> cfg = static + params -> session(cfg) in the executor
    -> checked score -> tell -> the after-trial steps (``after_trial``: settle the ticket
    first, on failure re-queueing the point; then what the config asks for)

Both ``run_hpo`` (one process) and ``hpo-worker`` (many) run trials through ``StudyHandle``.
Failures are settled in ``settle``; the tickets of lost workers are recovered in ``recovery``.
Every database step is a method of the storage layer that waits out an outage itself and is
idempotent, so it may be replayed when its answer was lost; nothing here retries.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from hpo_framework.config.algorithms import build_pruner, build_sampler, worker_seed
from hpo_framework.config.param_tree import merge
from hpo_framework.config.schema import Config
from hpo_framework.exceptions import StorageError, TrialLost, TrialPruned
from hpo_framework.runtime.after_trial import AfterTrial, Finished, FireHook, point_of, steps_for
from hpo_framework.runtime.executor import InProcessExecutor, ProcessExecutor, describe_error
from hpo_framework.runtime.heartbeat import Heartbeat
from hpo_framework.runtime.recovery import Sweeper
from hpo_framework.runtime.settle import Ledger
from hpo_framework.runtime.tracking import Trackers
from hpo_framework.session import checkpoint_store
from hpo_framework.storage.backend import Backend
from hpo_framework.storage.database import without_waiting
from hpo_framework.storage.registry import FAILED, OPEN, StudyRecord
from hpo_framework.storage.trial_attrs import ATTEMPT_ATTR, int_attr
from hpo_framework.storage.trial_store import TrialStore

log = logging.getLogger("hpo.trial")


def _nothing() -> None:
    pass


class OptunaLink:
    """``report`` and ``trial()`` on an Optuna trial of this process (its storage, a
    ``TrialStore``, waits out outages)."""

    def __init__(
        self,
        trial: optuna.Trial,
        n_objectives: int,
        info: dict[str, Any],
        searched: frozenset[str] = frozenset(),
        store: TrialStore | None = None,
    ) -> None:
        self.trial = trial
        self.store = store  # where metric histories go (none: last values only)
        self.n_objectives = n_objectives
        self.info = info
        self.searched = searched  # the names search_space: owns

    def constrain(self, key: str, value: float) -> None:
        self._write(lambda: self.trial.set_constraint(key, value))

    def suggest(self, kind: str, name: str, kwargs: Mapping[str, Any]) -> Any:
        if name in self.searched:
            raise ValueError(f"{name!r} is a parameter of search_space:; it arrives in cfg")
        if kind not in ("int", "float", "categorical"):
            raise ValueError(f"no suggest_{kind}; sessions ask with suggest_int/float/categorical")
        return getattr(self.trial, f"suggest_{kind}")(name, **kwargs)

    def set_attr(self, key: str, value: Any) -> None:
        self._write(lambda: self.trial.set_user_attr(key, value))

    def log(self, step: int | None, values: Mapping[str, float | int]) -> None:
        trial = self.trial
        for key, value in values.items():  # the last values, and TrialLost if failed elsewhere
            self.set_attr(key, value)
        if self.store is not None:
            self.store.log_metrics(trial._trial_id, step, values)

    def _write(self, op: Callable[[], None]) -> None:
        """A write of the running trial; TrialLost if another worker failed it meanwhile."""
        try:
            op()
        except optuna.exceptions.UpdateFinishedTrialError:
            raise TrialLost(f"trial {self.trial.number} was failed by another worker") from None

    def report(self, value: float, step: int) -> None:
        trial = self.trial
        if self.n_objectives > 1:
            return
        self._write(lambda: trial.report(value, step))
        if trial.should_prune():
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


def open_study(
    backend: Backend,
    record: StudyRecord,
    config: Config,
    executor: InProcessExecutor | ProcessExecutor,
    *,
    worker_id: str,
    worker_index: int = 0,
    sweeper: Sweeper | None = None,
) -> StudyHandle:
    """Assemble a study for this process: its sampler (seeded per worker), pruner, Optuna
    study over a trial cache of its own, trackers and sweeper."""
    spec = config.study
    sampler = build_sampler(
        spec.sampler.name,
        worker_seed(spec.sampler.seed, worker_index),
        spec.sampler.options,
        config.search_space,
        config.source,
    )
    pruner = build_pruner(spec.pruner.name, spec.pruner.options)
    # One Study object per study per process: its trial cache makes sampling incremental,
    # and the trials this process runs are served from memory (trial_store).
    store = backend.trial_store()
    study = store.load_study(record.name, sampler, pruner)
    trackers = (
        None
        if config.tracking is None
        else Trackers(config.tracking, record.name, record.study_id, backend.engine)
    )
    sweeper = sweeper or Sweeper(backend, worker_id, spec.heartbeat_interval)
    return StudyHandle(
        backend, record, config, executor, store, study,
        worker_id=worker_id, sweeper=sweeper, trackers=trackers,
    )  # fmt: skip


class StudyHandle:
    """A study loaded in this process (``open_study``): the trial path, then the after-trial
    steps in order."""

    def __init__(
        self,
        backend: Backend,
        record: StudyRecord,
        config: Config,
        executor: InProcessExecutor | ProcessExecutor,
        store: TrialStore,
        study: optuna.Study,
        *,
        worker_id: str,
        sweeper: Sweeper,
        trackers: Trackers | None,
    ) -> None:
        self.backend = backend
        self.record = record
        self.config = config
        self.executor = executor
        self.store = store
        self.study = study
        self.worker_id = worker_id
        self.trackers = trackers
        spec = config.study
        self.n_objectives = len(spec.directions)
        self.ledger = Ledger(backend, record.study_id, record.name, spec.max_retries)
        self.sweeper = sweeper
        self.sweeper.ledgers[record.study_id] = self.ledger
        # What happens once a trial's result is recorded, in order (``after_trial``).
        self.after_trial: list[AfterTrial] = steps_for(
            config, self.ledger, store, worker_id, trackers
        )
        self._untrack: Callable[[], None] = _nothing  # the heartbeat's, while a trial runs

    @property
    def name(self) -> str:
        return self.record.name

    # --- the loop both run_hpo and hpo-worker run -------------------------------------------

    def run_trials(
        self,
        heartbeat: Heartbeat,
        *,
        stopping: Callable[[], bool],
        until: float | None = None,
        on_outcome: Callable[[TrialOutcome], None] | None = None,
    ) -> tuple[int, TrialOutcome | None]:
        """Recover lost workers' tickets, then run trials while the study has budget, nothing
        asks to stop and the monotonic clock is before ``until``; ``on_outcome`` sees each
        trial's outcome (a progress bar).

        With no budget left to claim but tickets still held elsewhere, it waits (without
        ``until``): one of them may fail and hand its ticket back, or belong to a lost worker
        whose trial this process must recover.

        Returns how many trials ran, and the outcome that broke the study's contract (the
        study is failed then), if one did.
        """
        ran = 0
        while not stopping() and (until is None or time.monotonic() < until):
            self.sweeper.sweep()  # at most once per interval
            outcome = self.run_one(heartbeat)
            if outcome is None:
                if until is not None or not self._others_in_flight():
                    break
                time.sleep(min(self.config.study.heartbeat_interval, 0.5))
                continue
            ran += 1
            if on_outcome is not None:
                on_outcome(outcome)
            if outcome.fatal:
                return ran, outcome
        return ran, None

    def _others_in_flight(self) -> bool:
        record = self.backend.registry.by_id(self.record.study_id)
        if record is None or record.state != OPEN or record.timed_out:
            return False
        return self.backend.tickets.held(record.study_id) > 0

    # --- one trial ----------------------------------------------------------------------------

    def run_one(self, heartbeat: Heartbeat) -> TrialOutcome | None:
        """Run one trial if the study has budget left; None when it has none."""
        study_id, me, spec = self.record.study_id, self.worker_id, self.config.study
        key = uuid.uuid4().hex  # makes the claim idempotent: a retry finds its own ticket
        ticket, trial_id = self.store.begin(
            study_id, key, me, spec.grace_period, self.backend.tickets
        )
        if ticket is None:
            return None
        heartbeat.track(ticket, me, spec.heartbeat_interval, spec.grace_period)
        self._untrack = heartbeat.untrack  # once the ticket is settled (``_finish``)
        try:
            if trial_id is None:  # recovered meanwhile, or every waiting trial popped by others
                log.warning("study=%s ticket %d lost before its trial began", self.name, ticket)
                # still ours (no other worker took it over): its unit of budget goes back now
                self.backend.tickets.settle(ticket, me, returned=True, failure=False)
                return None
            return self._run_trial(ticket, trial_id)
        finally:
            heartbeat.untrack()
            self._untrack = _nothing

    def _run_trial(self, ticket: int, trial_id: int) -> TrialOutcome:
        # Like Study.ask: the sampler must see the trials finished since the last one.
        self.study._thread_local.cached_all_trials = None
        trial = optuna.Trial(self.study, trial_id)
        started = time.monotonic()
        try:
            with self.store.one_sync():
                params = self.config.search_space.sample(trial)
        except Exception as e:  # a sampler that cannot sample this space: this trial fails
            return self._finish(ticket, trial, TrialState.FAIL, None, started, describe_error(e))
        cfg = merge(self.config.static, params)
        info = {
            "study": self.name, "number": trial.number, "worker": self.worker_id,
            "attempt": int_attr(trial.user_attrs, ATTEMPT_ATTR, 0),
            "checkpoint": self._checkpoint_of(point_of(trial.user_attrs, trial.number)),
        }  # fmt: skip
        searched = frozenset(self.config.search_space.names)
        link = OptunaLink(trial, self.n_objectives, info, searched, self.store)
        try:
            result = self.executor.run(
                self.record.session_ref or "", cfg, link, self.n_objectives,
                self.config.study.trial_timeout,
            )  # fmt: skip
        except BaseException as e:  # the worker stops cold, or run_hpo's Ctrl-C: fail, re-queue
            why = str(e) or f"interrupted ({type(e).__name__})"
            try:
                with without_waiting():  # "at once", even with the database gone
                    self._finish(ticket, trial, TrialState.FAIL, None, started, why)
            except StorageError as lost:
                log.warning(
                    "study=%s trial=%d not failed in the database (%s): the sweep of a live "
                    "worker will fail and re-queue it", self.name, trial.number, lost,
                )  # fmt: skip
            raise
        if result.kind == "done":
            return self._finish(ticket, trial, TrialState.COMPLETE, result.values, started, None)
        if result.kind == "pruned":
            return self._finish(ticket, trial, TrialState.PRUNED, None, started, None)
        if result.kind == "lost":
            return self._dropped(trial, started)
        error = result.error or "session failed"
        if not result.fatal:
            log.warning(
                "study=%s trial=%d session failed: %s%s", self.name, trial.number, error,
                f"\n{result.traceback}" if result.traceback else "",
            )  # fmt: skip
        outcome = self._finish(
            ticket, trial, TrialState.FAIL, None, started, error, result.traceback
        )
        if result.fatal:
            self.backend.registry.set_state(self.name, FAILED, error)
            if self.config.study.on_failed:
                FireHook(self.backend, self.record.study_id, self.name)()
            return dataclasses.replace(outcome, fatal=True)
        return outcome

    def _finish(
        self,
        ticket: int,
        trial: optuna.Trial,
        state: TrialState,
        values: list[float] | None,
        started: float,
        error: str | None,
        tb: str | None = None,
    ) -> TrialOutcome:
        """Record the result, then run the after-trial steps in order."""
        duration = time.monotonic() - started
        told = self.store.tell(
            self.study, trial, state, values, error, tb, spends=(ticket, self.worker_id)
        )
        if not told.kept:
            return self._dropped(trial, started)
        finished = Finished(ticket, trial, state, values, duration, error, told.settled)
        settle, *rest = self.after_trial  # ``steps_for`` puts the ticket's settling first
        settle(finished)
        # Settled: the heartbeat stops now, not after the steps below (trackers may take a
        # while), so a beat that finds the ticket gone can tell it was lost (``Heartbeat``).
        self._untrack()
        for step in rest:
            step(finished)
        return TrialOutcome(self.name, trial.number, state, values, finished.duration_s, error)

    # --- checkpoints (hpo_framework.session.checkpoint) -----------------------------------------

    def _checkpoint_of(self, point: int) -> dict[str, str | None] | None:
        """Where the session's process finds a point's checkpoint (the first trial of its
        retries): the store's settings and the artifact's name."""
        spec = self.config.checkpoints
        if spec is None:
            return None
        location = checkpoint_store.where(spec)
        return {
            **location,
            "id": checkpoint_store.artifact_id(location, self.record.study_id, point),
        }

    def _dropped(self, trial: optuna.Trial, started: float) -> TrialOutcome:
        log.warning(
            "study=%s trial=%d result dropped: the trial was failed as stale and retried "
            "elsewhere while this worker was unresponsive", self.name, trial.number,
        )  # fmt: skip
        duration = time.monotonic() - started
        return TrialOutcome(self.name, trial.number, TrialState.FAIL, None, duration, "lost")
