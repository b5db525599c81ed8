"""What happens once a trial's result is recorded: small steps run in order, like Optuna's
callbacks. ``steps_for`` lists the ones a study's config asks for: the ticket first (the
budget's exactness rests on it), then checkpoint clean-up, stop rules, trackers, hooks, and
the log line last.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from hpo_framework.config.schema import CheckpointSpec, Config, StopWhen
from hpo_framework.runtime.hooks import fire_if_ended
from hpo_framework.runtime.settle import Ledger, settle_failure
from hpo_framework.runtime.stopping import stop_reason
from hpo_framework.runtime.tracking import FinishedTrial, Trackers
from hpo_framework.session import checkpoint_store
from hpo_framework.storage.backend import Backend
from hpo_framework.storage.registry import OPEN, STOPPED
from hpo_framework.storage.trial_attrs import ATTEMPT_ATTR, RETRY_OF_ATTR, int_attr
from hpo_framework.storage.trial_store import TrialStore

log = logging.getLogger("hpo.trial")


@dataclass(frozen=True)
class Finished:
    """A trial whose result is recorded, as the after-trial steps see it."""

    ticket: int
    trial: optuna.Trial
    state: TrialState
    values: list[float] | None
    duration_s: float
    error: str | None
    #: Its ticket was spent together with the result (``TrialStore.tell``).
    settled: bool = False


#: One job after a recorded trial.
AfterTrial = Callable[[Finished], None]


def point_of(user_attrs: dict[str, object], number: int) -> int:
    """The point a trial evaluates, named by the first trial of its retries."""
    return int_attr(user_attrs, RETRY_OF_ATTR, number)


def _finished_trials(store: TrialStore, study_id: int) -> list[optuna.trial.FrozenTrial]:
    return store.get_all_trials(
        study_id, deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)
    )


@dataclass
class Settle:
    """A failed trial's point is re-queued, then its ticket returned; any other spends it."""

    ledger: Ledger
    worker_id: str

    def __call__(self, f: Finished) -> None:
        backend = self.ledger.backend
        if f.settled:
            return
        if f.state == TrialState.FAIL:
            failed = backend.trial(f.trial._trial_id)
            if failed is not None:  # None: deleted with its study, nothing left to settle
                settle_failure(self.ledger, failed, f.ticket, self.worker_id)
        else:
            backend.tickets.settle(f.ticket, self.worker_id, returned=False, failure=False)


@dataclass
class CleanCheckpoints:
    """A finished point's checkpoint goes, unless it is among the ``keep_best`` best; kept
    ones that fell out of the best go too. A failed point may run again: its stays."""

    spec: CheckpointSpec
    store: TrialStore
    study_id: int
    name: str
    n_objectives: int
    maximize: bool
    removed: set[int] = field(default_factory=set)  # points this process has cleaned up

    def __call__(self, f: Finished) -> None:
        if f.state == TrialState.FAIL:
            return
        doomed = {point_of(f.trial.user_attrs, f.trial.number)}
        if self.spec.keep_best and self.n_objectives == 1:
            finished = _finished_trials(self.store, self.study_id)
            sign = -1.0 if self.maximize else 1.0
            complete = [t for t in finished if t.state == TrialState.COMPLETE]
            best = sorted(complete, key=lambda t: (sign * t.values[0], t.number))
            keep = {point_of(t.user_attrs, t.number) for t in best[: self.spec.keep_best]}
            doomed = {point_of(t.user_attrs, t.number) for t in finished} - keep
        elif self.spec.keep_best:
            doomed = set()  # several objectives: no single "best"; all are kept
        location = checkpoint_store.where(self.spec)
        try:
            store = checkpoint_store.open_store(location, patient=False)
            for p in sorted(doomed - self.removed):
                with contextlib.suppress(checkpoint_store.ArtifactNotFound):
                    store.remove(checkpoint_store.artifact_id(location, self.study_id, p))
                self.removed.add(p)
        except Exception as e:  # a store that is away costs space, never the trial (or time)
            log.warning("study=%s checkpoints not cleaned up: %s", self.name, e)


@dataclass
class ApplyStopRules:
    """Stop the study if ``study.stop_when`` is met now (the first worker to see it wins)."""

    stop_when: StopWhen
    backend: Backend
    store: TrialStore
    study_id: int
    name: str
    maximize: bool

    def __call__(self, f: Finished) -> None:
        if f.state == TrialState.FAIL:
            return
        finished = _finished_trials(self.store, self.study_id)
        last = next((t for t in finished if t.number == f.trial.number), None)
        reason = stop_reason(self.stop_when, self.maximize, finished, last)
        if reason is not None and self.backend.registry.move(
            self.name, OPEN, STOPPED, error=reason
        ):
            log.info("study=%s stopped: %s", self.name, reason)


@dataclass
class Track:
    """The finished trial, to the study's trackers (MLflow, TensorBoard)."""

    trackers: Trackers
    worker_id: str

    def __call__(self, f: Finished) -> None:
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


@dataclass
class FireHook:
    """``on_done``/``on_failed`` if this trial was the study's last (see ``hooks``)."""

    backend: Backend
    study_id: int
    name: str

    def __call__(self, f: Finished | None = None) -> None:
        try:
            fire_if_ended(self.backend, self.study_id)
        except Exception as e:  # a hook never takes a worker down
            log.warning("study=%s hook not fired: %s", self.name, e)


@dataclass
class LogLine:
    """One line per trial; its fields ride along for JSON logs (``logs.JsonFormatter``)."""

    name: str
    worker_id: str

    def __call__(self, f: Finished) -> None:
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


def steps_for(
    config: Config,
    ledger: Ledger,
    store: TrialStore,
    worker_id: str,
    trackers: Trackers | None,
) -> list[AfterTrial]:
    """The after-trial steps of a study, in the order they run."""
    spec, backend = config.study, ledger.backend
    study_id, name = ledger.study_id, ledger.name
    maximize = spec.directions[0] == "maximize"
    steps: list[AfterTrial] = [Settle(ledger, worker_id)]
    if config.checkpoints is not None:
        steps.append(
            CleanCheckpoints(
                config.checkpoints, store, study_id, name, len(spec.directions), maximize
            )
        )
    if spec.stop_when:
        steps.append(ApplyStopRules(spec.stop_when, backend, store, study_id, name, maximize))
    if trackers is not None:
        steps.append(Track(trackers, worker_id))
    if spec.on_done or spec.on_failed:
        steps.append(FireHook(backend, study_id, name))
    steps.append(LogLine(name, worker_id))
    return steps
