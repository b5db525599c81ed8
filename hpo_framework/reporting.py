"""``report(value, step)``: pruning without coupling the session to Optuna.

The trial that is running in this thread is kept in a context variable; outside a trial
(a session called by hand, in a notebook or a unit test) ``report`` does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import optuna

from hpo_framework.exceptions import TrialLost, TrialPruned
from hpo_framework.storage import with_db_retry

_current: contextvars.ContextVar[optuna.Trial | None] = contextvars.ContextVar(
    "hpo_current_trial", default=None
)


def report(value: float, step: int) -> None:
    """Record an intermediate score of the running trial; raise TrialPruned if it should stop.

    Call it once per epoch (or any step) with the same kind of score the session returns.
    Multi-objective studies cannot be pruned by Optuna; there, as outside a trial, it is a no-op.
    """
    trial = _current.get()
    if trial is None or len(trial.study.directions) > 1:
        return
    value = float(value)
    if not math.isfinite(value):
        return  # a NaN step is the session's to handle; Optuna would reject it
    try:
        with_db_retry(lambda: trial.report(value, int(step)), "reporting a step")
    except optuna.exceptions.UpdateFinishedTrialError:
        raise TrialLost(f"trial {trial.number} was failed by another worker") from None
    if with_db_retry(trial.should_prune, "asking the pruner"):
        raise TrialPruned(f"trial {trial.number} pruned at step {step} (value {value:g})")


@contextlib.contextmanager
def bound_to(trial: optuna.Trial) -> Iterator[None]:
    """Make ``report`` talk to ``trial`` for the duration of one session call."""
    token = _current.set(trial)
    try:
        yield
    finally:
        _current.reset(token)
