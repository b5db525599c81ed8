"""One study as a process serves it, and the life of one trial: ticket, sample, session, result.

This is the whole data path of a trial::

    ticket (tickets; heartbeat from here) -> trial row (waiting point or new, bound to the
    ticket) -> params (param_sampler) -> cfg = static + params -> session(cfg) in the executor
    -> checked score -> tell -> settle the ticket (on failure: re-queue the point, then
    return the ticket)

Both ``run_hpo`` (one process) and ``hpo-worker`` (many) run trials through ``StudyHandle``.
Failures are settled in ``settle``; the tickets of lost workers are recovered in ``recovery``.
Every database step here is idempotent, so ``with_db_retry`` may replay one whose answer was
lost.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.trial import TrialState

from hpo_framework import defaults
from hpo_framework.config.algorithms import build_pruner, build_sampler, worker_seed
from hpo_framework.config.schema import Config
from hpo_framework.exceptions import StorageError, TrialLost, TrialPruned
from hpo_framework.param_sampler import merge
from hpo_framework.runtime.executor import InProcessExecutor, ProcessExecutor, describe_error
from hpo_framework.runtime.heartbeat import Heartbeat
from hpo_framework.runtime.hooks import fire_if_ended
from hpo_framework.runtime.recovery import Sweeper
from hpo_framework.runtime.settle import Ledger, settle_failure
from hpo_framework.runtime.stopping import stop_reason
from hpo_framework.runtime.tracking import FinishedTrial, Trackers
from hpo_framework.session import checkpoint_store
from hpo_framework.storage import metrics
from hpo_framework.storage.database import with_db_retry, without_waiting
from hpo_framework.storage.optuna_tables import has_waiting_trials
from hpo_framework.storage.registry import FAILED, OPEN, STOPPED, Registry, StudyRecord
from hpo_framework.storage.tickets import Tickets
from hpo_framework.storage.trial_attrs import (
    ATTEMPT_ATTR,
    ERROR_ATTR,
    RETRY_OF_ATTR,
    TICKET_ATTR,
    TRACEBACK_ATTR,
    WORKER_ATTR,
    int_attr,
)
from hpo_framework.storage.trial_store import TrialStore, create_trial_once

log = logging.getLogger("hpo.trial")

#: How often a worker looks for a waiting trial that others keep popping first.
_POP_ROUNDS = 5


class OptunaLink:
    """``report`` and ``trial()`` on an Optuna trial of this process, the database retried."""

    def __init__(
        self,
        trial: optuna.Trial,
        n_objectives: int,
        info: dict[str, Any],
        searched: frozenset[str] = frozenset(),
        engine: sa.Engine | None = None,
    ) -> None:
        self.trial = trial
        self.engine = engine  # where metric histories go (none: last values only)
        self.n_objectives = n_objectives
        self.info = info
        self.searched = searched  # the names search_space: owns

    def constrain(self, key: str, value: float) -> None:
        self._write(lambda: self.trial.set_constraint(key, value), "recording a constraint")

    def suggest(self, kind: str, name: str, kwargs: Mapping[str, Any]) -> Any:
        if name in self.searched:
            raise ValueError(f"{name!r} is a parameter of search_space:; it arrives in cfg")
        if kind not in ("int", "float", "categorical"):
            raise ValueError(f"no suggest_{kind}; sessions ask with suggest_int/float/categorical")
        suggest = getattr(self.trial, f"suggest_{kind}")
        return with_db_retry(lambda: suggest(name, **kwargs), "sampling a parameter")

    def set_attr(self, key: str, value: Any) -> None:
        self._write(lambda: self.trial.set_user_attr(key, value), "recording an attribute")

    def log(self, step: int | None, values: Mapping[str, float | int]) -> None:
        trial = self.trial
        for key, value in values.items():  # the last values, and TrialLost if failed elsewhere
            self.set_attr(key, value)
        engine = self.engine
        if engine is not None:
            with_db_retry(
                lambda: metrics.append(engine, trial._trial_id, step, values), "logging metrics"
            )

    def _write(self, op: Callable[[], None], what: str) -> None:
        """A write of the running trial; TrialLost if another worker failed it meanwhile."""
        try:
            with_db_retry(op, what)
        except optuna.exceptions.UpdateFinishedTrialError:
            raise TrialLost(f"trial {self.trial.number} was failed by another worker") from None

    def report(self, value: float, step: int) -> None:
        trial = self.trial
        if self.n_objectives > 1:
            return
        self._write(lambda: trial.report(value, step), "reporting a step")
        if with_db_retry(trial.should_prune, "asking the pruner"):
            raise TrialPruned(f"trial {trial.number} pruned at step {step} (value {value:g})")


def _point_of(user_attrs: dict[str, Any], number: int) -> int:
    """The point a trial evaluates, named by the first trial of its retries."""
    return int_attr(user_attrs, RETRY_OF_ATTR, number)


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


@dataclass(frozen=True)
class Finished:
    """A trial whose result is recorded, as the after-trial steps see it."""

    ticket: int
    trial: optuna.Trial
    state: TrialState
    values: list[float] | None
    duration_s: float
    error: str | None


#: One job after a recorded trial (like Optuna's callbacks); ``StudyHandle.after_trial``
#: lists them in the order they run.
AfterTrial = Callable[[Finished], None]


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
        sweeper: Sweeper | None = None,
    ) -> None:
        self.storage = storage
        self.registry = Registry(storage.engine)
        self.tickets = Tickets(storage.engine)
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
        # One Study object per study per process: its trial cache makes sampling incremental,
        # and the trials this process runs are served from memory (trial_store).
        self.store = TrialStore(storage)
        self.study = with_db_retry(
            lambda: optuna.load_study(
                study_name=record.name, storage=self.store, sampler=sampler, pruner=pruner
            ),
            f"loading study {record.name!r}",
        )
        self.n_objectives = len(spec.directions)
        self._removed_points: set[int] = set()  # checkpoints this process has removed
        self.trackers = (
            None
            if config.tracking is None
            else Trackers(config.tracking, record.name, record.study_id, storage.engine)
        )
        self.ledger = Ledger(
            storage, self.registry, self.tickets, record.study_id, record.name, spec.max_retries
        )
        self.sweeper = sweeper or Sweeper(storage, worker_id, spec.heartbeat_interval)
        self.sweeper.ledgers[record.study_id] = self.ledger
        # What happens once a trial's result is recorded, in order: the ticket first (the
        # budget's exactness rests on it), then what this study's config asks for.
        self.after_trial: list[AfterTrial] = [self._settle]
        if config.checkpoints is not None:
            self.after_trial.append(self._clean_checkpoints_of)
        if spec.stop_when:
            self.after_trial.append(self._apply_stop_rules)
        if self.trackers is not None:
            self.after_trial.append(self._track)
        if spec.on_done or spec.on_failed:
            self.after_trial.append(self._fire_hook_if_ended)
        self.after_trial.append(self._log)

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
        record = with_db_retry(lambda: self.registry.by_id(self.record.study_id), "reading")
        if record is None or record.state != OPEN or record.timed_out:
            return False
        return with_db_retry(lambda: self.tickets.held(record.study_id), "reading") > 0

    # --- one trial ----------------------------------------------------------------------------

    def run_one(self, heartbeat: Heartbeat) -> TrialOutcome | None:
        """Run one trial if the study has budget left; None when it has none."""
        study_id, me, spec = self.record.study_id, self.worker_id, self.config.study
        key = uuid.uuid4().hex  # makes the claim idempotent: a retry finds its own ticket
        ticket = with_db_retry(
            lambda: self.tickets.claim(study_id, me, spec.grace_period, key), "claiming"
        )
        if ticket is None:
            return None
        heartbeat.track(ticket, me, spec.heartbeat_interval, spec.grace_period)
        try:
            retrying = [False]

            def start() -> int | None:
                if retrying[0]:  # an earlier try may have committed before its answer was lost
                    found = self.tickets.trial_of(ticket)
                    if found is not None:
                        self.store.adopt(study_id, self.storage.get_trial(found))
                        return found
                retrying[0] = True
                return self._start_trial(ticket)

            trial_id = with_db_retry(start, "starting a trial")
            if trial_id is None:  # silent past the grace period: the ticket was recovered
                log.warning("study=%s ticket %d lost before its trial began", self.name, ticket)
                return None
            return self._run_trial(ticket, trial_id)
        finally:
            heartbeat.untrack()

    def _start_trial(self, ticket: int) -> int | None:
        """Take a waiting trial (an enqueued point or a retry) if any, else create a new one;
        either way bound to ``ticket``. None if the ticket is no longer this worker's."""
        store, study_id = self.store, self.record.study_id
        for _ in range(_POP_ROUNDS):
            if store.pg:  # one transaction: create and bind, unless a trial is waiting
                started = store.start_new(study_id, ticket, self.worker_id)
                if started is not True:
                    return started
            elif not has_waiting_trials(self.storage, study_id):
                return self._create_and_bind(ticket)
            popped = self._pop_waiting(ticket)
            if popped is not None:
                return popped
            # Each waiting trial seen was popped by another worker first: look again.
        return None  # or this ticket was taken over, which makes every pop fail

    def _pop_waiting(self, ticket: int) -> int | None:
        study_id, me = self.record.study_id, self.worker_id
        waiting = self.store.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
        for trial in waiting:
            if self.tickets.pop_waiting(ticket, me, trial._trial_id):
                running = copy.deepcopy(trial)
                running.state, running.datetime_start = TrialState.RUNNING, datetime.now()
                running.user_attrs[WORKER_ATTR] = me
                self.store.adopt(study_id, running)
                return trial._trial_id
        return None

    def _create_and_bind(self, ticket: int) -> int | None:
        """SQLite's way to a new trial: Optuna's steps, then the ticket's binding."""
        template = optuna.trial.create_trial(state=TrialState.WAITING)
        template.state = TrialState.RUNNING
        template.datetime_start = datetime.now()
        template.user_attrs = {WORKER_ATTR: self.worker_id}
        template.system_attrs = {TICKET_ATTR: ticket}
        trial = create_trial_once(self.store, self.record.study_id, template)
        if not self.tickets.bind(ticket, self.worker_id, trial._trial_id):
            # Recovered while this worker was frozen; the new trial is an orphan the sweep
            # of any worker fails (it has no parameters yet: nothing to re-queue).
            return None
        self.store.adopt(self.record.study_id, trial)
        return int(trial._trial_id)

    def _run_trial(self, ticket: int, trial_id: int) -> TrialOutcome:
        # Like Study.ask: the sampler must see the trials finished since the last one.
        self.study._thread_local.cached_all_trials = None
        trial = with_db_retry(lambda: optuna.Trial(self.study, trial_id), "loading a trial")
        started = time.monotonic()
        try:
            with self.store.one_sync():
                params = with_db_retry(lambda: self.config.search_space.sample(trial), "sampling")
        except Exception as e:  # a sampler that cannot sample this space: this trial fails
            return self._finish(ticket, trial, TrialState.FAIL, None, started, describe_error(e))
        cfg = merge(self.config.static, params)
        info = {
            "study": self.name, "number": trial.number, "worker": self.worker_id,
            "attempt": int_attr(trial.user_attrs, ATTEMPT_ATTR, 0),
            "checkpoint": self._checkpoint_of(_point_of(trial.user_attrs, trial.number)),
        }  # fmt: skip
        searched = frozenset(self.config.search_space.names)
        link = OptunaLink(trial, self.n_objectives, info, searched, self.storage.engine)
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
            with_db_retry(lambda: self.registry.set_state(self.name, FAILED, error), "stop")
            if self.config.study.on_failed:
                self._fire_hook_if_ended()
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
        kept = with_db_retry(
            lambda: self._tell(trial, state, values, error, tb), "saving a result"
        )
        if not kept:
            return self._dropped(trial, started)
        finished = Finished(ticket, trial, state, values, duration, error)
        for step in self.after_trial:
            step(finished)
        return TrialOutcome(self.name, trial.number, state, values, finished.duration_s, error)

    # --- after a trial (StudyHandle.after_trial) ----------------------------------------------

    def _settle(self, f: Finished) -> None:
        """A failed trial's point is re-queued, then its ticket returned; any other spends it."""
        if f.state == TrialState.FAIL:
            failed = with_db_retry(lambda: self.storage.get_trial(f.trial._trial_id), "reading")
            settle_failure(self.ledger, failed, f.ticket, self.worker_id)
        else:
            with_db_retry(
                lambda: self.tickets.settle(
                    f.ticket, self.worker_id, returned=False, failure=False
                ),
                "settling a ticket",
            )

    def _track(self, f: Finished) -> None:
        assert self.trackers is not None
        self.trackers.send(
            FinishedTrial(
                f.trial.number,
                f.trial._trial_id,
                f.state.name,
                f.values,
                dict(f.trial.params),
                int_attr(f.trial.user_attrs, ATTEMPT_ATTR, 0),
                self.worker_id,
            )  # fmt: skip
        )

    def _log(self, f: Finished) -> None:
        value = "-" if f.values is None else ",".join(f"{v:.6g}" for v in f.values)
        fields = {
            "study": self.name, "trial": f.trial.number, "state": f.state.name,
            "values": f.values, "duration_s": round(f.duration_s, 3), "worker": self.worker_id,
            "error": f.error,
        }  # fmt: skip
        log.info(
            "study=%s trial=%d state=%s value=%s duration=%.2fs worker=%s%s",
            self.name, f.trial.number, f.state.name, value, f.duration_s, self.worker_id,
            f" error={f.error}" if f.error else "", extra={"hpo": fields},
        )  # fmt: skip

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

    def _clean_checkpoints_of(self, f: Finished) -> None:
        if f.state != TrialState.FAIL:  # a failed point may run again: its checkpoint stays
            self._clean_checkpoints(_point_of(f.trial.user_attrs, f.trial.number))

    def _clean_checkpoints(self, point: int) -> None:
        """A finished point's checkpoint goes, unless it is among the ``keep_best`` best;
        kept ones that fell out of the best go too."""
        spec = self.config.checkpoints
        assert spec is not None
        doomed = {point}
        if spec.keep_best and self.n_objectives == 1:
            finished = with_db_retry(
                lambda: self.store.get_all_trials(
                    self.record.study_id, deepcopy=False,
                    states=(TrialState.COMPLETE, TrialState.PRUNED),
                ),
                "reading the finished trials",
            )  # fmt: skip
            sign = -1.0 if self.config.study.directions[0] == "maximize" else 1.0
            complete = [t for t in finished if t.state == TrialState.COMPLETE]
            best = sorted(complete, key=lambda t: (sign * t.values[0], t.number))
            keep = {_point_of(t.user_attrs, t.number) for t in best[: spec.keep_best]}
            doomed = {_point_of(t.user_attrs, t.number) for t in finished} - keep
        elif spec.keep_best:
            doomed = set()  # several objectives: no single "best"; all are kept
        location = checkpoint_store.where(spec)
        try:
            store = checkpoint_store.open_store(location, patient=False)
            for p in sorted(doomed - self._removed_points):
                with contextlib.suppress(checkpoint_store.ArtifactNotFound):
                    store.remove(checkpoint_store.artifact_id(location, self.record.study_id, p))
                self._removed_points.add(p)
        except Exception as e:  # a store that is away costs space, never the trial (or time)
            log.warning("study=%s checkpoints not cleaned up: %s", self.name, e)

    def _fire_hook_if_ended(self, f: Finished | None = None) -> None:
        """``on_done``/``on_failed`` if this trial was the study's last (see ``hooks``)."""
        try:
            with_db_retry(lambda: fire_if_ended(self.storage, self.record.study_id), "a hook")
        except Exception as e:  # a hook never takes a worker down
            log.warning("study=%s hook not fired: %s", self.name, e)

    def _apply_stop_rules(self, f: Finished) -> None:
        """Stop the study if ``study.stop_when`` is met now (the first worker to see it wins)."""
        if f.state == TrialState.FAIL:
            return
        study_id, number = self.record.study_id, f.trial.number
        finished = with_db_retry(
            lambda: self.store.get_all_trials(
                study_id, deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)
            ),
            "reading the finished trials",
        )
        last = next((t for t in finished if t.number == number), None)
        maximize = self.config.study.directions[0] == "maximize"
        reason = stop_reason(self.config.study.stop_when, maximize, finished, last)
        if reason is not None and with_db_retry(
            lambda: self.registry.move(self.name, OPEN, STOPPED, error=reason), "stopping"
        ):
            log.info("study=%s stopped: %s", self.name, reason)

    def _dropped(self, trial: optuna.Trial, started: float) -> TrialOutcome:
        log.warning(
            "study=%s trial=%d result dropped: the trial was failed as stale and retried "
            "elsewhere while this worker was unresponsive", self.name, trial.number,
        )  # fmt: skip
        duration = time.monotonic() - started
        return TrialOutcome(self.name, trial.number, TrialState.FAIL, None, duration, "lost")

    def _tell(
        self,
        trial: optuna.Trial,
        state: TrialState,
        values: list[float] | None,
        error: str | None,
        tb: str | None = None,
    ) -> bool:
        """Record the result; False if the trial had been finished by someone else (stale)."""
        try:
            if error is not None:
                self.store.set_trial_user_attr(
                    trial._trial_id, ERROR_ATTR, error[: defaults.ERROR_TEXT_MAX]
                )
            if tb:
                self.store.set_trial_user_attr(trial._trial_id, TRACEBACK_ATTR, tb[-8000:])
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
                return (
                    stored.user_attrs.get(ERROR_ATTR) == (error or "")[: defaults.ERROR_TEXT_MAX]
                )
            return values is None or stored.values == values
