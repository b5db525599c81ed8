"""``report(value, step)``: pruning without coupling the session to Optuna.

The running trial is reached through a *link* kept in a context variable: in the worker's
process a ``trials.OptunaLink`` (the Optuna trial itself), in the executor process a
link that asks the worker over a pipe (``hpo_framework.executor``). Outside a trial (a session
called by hand, in a notebook or a unit test) ``report`` does nothing. Nothing here touches
the database, so the executor process imports neither SQLAlchemy nor the storage layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Protocol


class TrialLink(Protocol):
    def report(self, value: float, step: int) -> None:
        """Record one finite intermediate value; raise TrialPruned or TrialLost to stop."""


_current: contextvars.ContextVar[TrialLink | None] = contextvars.ContextVar(
    "hpo_current_trial", default=None
)


def report(value: float, step: int) -> None:
    """Record an intermediate score of the running trial; raise TrialPruned if it should stop.

    Call it once per epoch (or any step) with the same kind of score the session returns.
    Multi-objective studies cannot be pruned by Optuna; there, as outside a trial, it is a no-op.
    """
    link = _current.get()
    if link is None:
        return
    value = float(value)
    if not math.isfinite(value):
        return  # a NaN step is the session's to handle; Optuna would reject it
    link.report(value, int(step))


@contextlib.contextmanager
def bound_to(link: TrialLink) -> Iterator[None]:
    """Make ``report`` talk to ``link`` for the duration of one session call."""
    token = _current.set(link)
    try:
        yield
    finally:
        _current.reset(token)
