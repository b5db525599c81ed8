"""``report(value, step)`` and ``trial()``: pruning and a trial's own records, without
coupling the session to Optuna.

The running trial is reached through a *link* kept in a context variable: in the worker's
process a ``trials.OptunaLink`` (the Optuna trial itself), in the executor process a
link that asks the worker over a pipe (``hpo_framework.executor``). Outside a trial (a session
called by hand, in a notebook or a unit test) ``report`` does nothing. Nothing here touches
the database, so the executor process imports neither SQLAlchemy nor the storage layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
from collections.abc import Iterator, Mapping
from typing import Any, Protocol


class TrialLink(Protocol):
    @property
    def info(self) -> Mapping[str, Any]:
        """``study``, ``number``, ``attempt`` and ``worker`` of the running trial."""

    def report(self, value: float, step: int) -> None:
        """Record one finite intermediate value; raise TrialPruned or TrialLost to stop."""

    def set_attr(self, key: str, value: Any) -> None:
        """Record a user attribute of the trial; raise TrialLost if it was failed elsewhere."""


#: User attributes the framework writes itself; a session may not overwrite them.
RESERVED_ATTRS = frozenset({"worker", "error", "traceback", "retry_of", "attempt", "copied_from"})


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


class TrialContext:
    """The running trial, as a session sees it (``hpo_framework.trial()``).

    Outside a trial (a session called by hand) every field is None and every method does
    nothing, like ``report``.
    """

    def __init__(self, link: TrialLink | None) -> None:
        self._link = link
        info = link.info if link is not None else {}
        self.study: str | None = info.get("study")
        self.number: int | None = info.get("number")
        #: 0 for a first evaluation, 1+ for a retry of a failed trial's point.
        self.attempt: int | None = info.get("attempt")
        self.worker: str | None = info.get("worker")

    def log(self, **metrics: float) -> None:
        """Record numbers beside the score (``log(accuracy=0.93, epoch=7)``) as user attributes
        of the trial, shown by ``hpo-inspect --trial`` and optuna-dashboard; a later call with
        the same name replaces the value."""
        for key, value in metrics.items():
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"trial().log({key}=...): {value!r} is not a finite number")
            self.set_attr(key, number)

    def set_attr(self, key: str, value: Any) -> None:
        """Record any JSON value as a user attribute of the trial."""
        if not isinstance(key, str) or not key or len(key) > 500:
            raise ValueError(f"trial().set_attr: the key must be a short string, got {key!r}")
        if key in RESERVED_ATTRS or key.startswith("hpo"):
            raise ValueError(f"trial().set_attr: {key!r} is the framework's own attribute")
        json.dumps(value)  # a TypeError now, not in the worker
        if self._link is not None:
            self._link.set_attr(key, value)


def current_info() -> Mapping[str, Any]:
    """The running trial's ``info`` (empty outside a trial)."""
    link = _current.get()
    return {} if link is None else link.info


def trial() -> TrialContext:
    """The trial this session call runs: number, attempt, worker, study, ``log``, ``set_attr``."""
    return TrialContext(_current.get())


@contextlib.contextmanager
def bound_to(link: TrialLink) -> Iterator[None]:
    """Make ``report`` talk to ``link`` for the duration of one session call."""
    token = _current.set(link)
    try:
        yield
    finally:
        _current.reset(token)
