"""``study.stop_when``: when a single-objective study has found what it was looking for.

Checked by the worker (or ``run_hpo``) that finished a trial, right after settling it; the
first to find a rule met moves the open study to ``stopped`` with the rule as its reason, and
running trials finish as on ``hpo-coordinator stop``. Nothing is read when no rule is set.
"""

from __future__ import annotations

from collections.abc import Sequence

from optuna.trial import FrozenTrial, TrialState

from hpo_framework.config.schema import StopWhen


def stop_reason(
    rule: StopWhen, maximize: bool, finished: Sequence[FrozenTrial], last: FrozenTrial | None
) -> str | None:
    """Why the study should stop now, or None. ``finished``: its COMPLETE and PRUNED trials;
    ``last``: the trial just finished."""
    if rule.target is not None and last is not None and last.state == TrialState.COMPLETE:
        value = last.values[0]
        if (value >= rule.target) if maximize else (value <= rule.target):
            return f"stop_when.target {rule.target:g} reached by trial {last.number} ({value:g})"
    if rule.patience is not None:
        complete = [t for t in finished if t.state == TrialState.COMPLETE]
        if not complete:
            return None
        sign = -1.0 if maximize else 1.0
        best = min(complete, key=lambda t: (sign * t.values[0], t.number))  # earliest of ties
        # finished after it, by the clock: with several workers a trial numbered later may
        # have finished before the best one did
        done = best.datetime_complete
        since = sum(
            1 for t in finished
            if t is not best and t.datetime_complete is not None and done is not None
            and t.datetime_complete > done
        )  # fmt: skip
        if since >= rule.patience:
            return (
                f"stop_when.patience: {since} finished trials without improvement since "
                f"trial {best.number} ({best.values[0]:g})"
            )
    return None
