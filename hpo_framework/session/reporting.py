"""``report(value, step)`` and ``trial()``: pruning and a trial's own records, without
coupling the session to Optuna.

The running trial is reached through a *link* kept in a context variable: in the worker's
process a ``trials.OptunaLink`` (the Optuna trial itself), in the executor process a
link that asks the worker over a pipe (``hpo_framework.runtime.executor``). Outside a trial (a
session called by hand, in a notebook or a unit test) ``report`` does nothing. Nothing here touches
the database, so the executor process imports neither SQLAlchemy nor the storage layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
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

    def log(self, step: int | None, metrics: Mapping[str, float | int]) -> None:
        """Append finite numbers to the trial's metric histories (``metrics``), the last of
        each also a user attribute; raise TrialLost if it was failed elsewhere."""

    def suggest(self, kind: str, name: str, kwargs: Mapping[str, Any]) -> Any:
        """Optuna's ``suggest_<kind>(name, **kwargs)`` on the running trial."""

    def constrain(self, key: str, value: float) -> None:
        """Optuna's ``set_constraint(key, value)`` on the running trial."""


#: User attributes the framework writes itself; a session may not overwrite them.
RESERVED_ATTRS = frozenset({"worker", "error", "traceback", "retry_of", "attempt", "copied_from"})


_current: contextvars.ContextVar[TrialLink | None] = contextvars.ContextVar(
    "hpo_current_trial", default=None
)
#: The key of a ``--best-config`` file that holds the values the session asked for itself.
SUGGESTED_KEY = "hpo_suggested"
#: Outside a trial: the values ``trial().suggest_*`` returns by name (``load_best``).
_replayed: dict[str, Any] = {}


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

    def log(self, step: int | None = None, **metrics: float) -> None:
        """Record numbers beside the score, each call appended to the trial's history
        (``log(step=epoch, val_mse=0.12, accuracy=0.93)``): ``hpo-inspect --trial N`` shows
        them, ``--metrics`` exports them, ``--plot`` draws them; the last value of each is also
        a user attribute of the trial (optuna-dashboard shows it). An int stays an int."""
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
            raise ValueError(f"trial().log(step=...): an int, got {step!r}")
        values: dict[str, float | int] = {}
        for key, value in metrics.items():
            if key in RESERVED_ATTRS or key.startswith("hpo"):
                raise ValueError(f"trial().log: {key!r} is the framework's own attribute")
            if isinstance(value, int) and not isinstance(value, bool):
                values[key] = value
                continue
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"trial().log({key}=...): {value!r} is not a finite number")
            values[key] = number
        if self._link is not None and values:
            self._link.log(step, values)

    def set_constraint(self, key: str, value: float) -> None:
        """Optuna's ``Trial.set_constraint``: the trial is feasible when every constraint value
        is <= 0; samplers that handle constraints (tpe, nsga2, gp) steer by them. Once per key."""
        number = float(value)
        if math.isnan(number):
            raise ValueError(f"trial().set_constraint({key!r}): NaN is not a constraint value")
        if self._link is not None:
            self._link.constrain(str(key), number)

    def set_attr(self, key: str, value: Any) -> None:
        """Record any JSON value as a user attribute of the trial."""
        if not isinstance(key, str) or not key or len(key) > 500:
            raise ValueError(f"trial().set_attr: the key must be a short string, got {key!r}")
        if key in RESERVED_ATTRS or key.startswith("hpo"):
            raise ValueError(f"trial().set_attr: {key!r} is the framework's own attribute")
        json.dumps(value)  # a TypeError now, not in the worker
        if self._link is not None:
            self._link.set_attr(key, value)

    # --- define-by-run: parameters the session asks for itself --------------------------------

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        """A float parameter sampled by the study's sampler, recorded and retried like the
        ones of ``search_space:`` (outside a trial: ``low``)."""
        return float(self._suggest("float", name, low, {"low": low, "high": high,
                                                         "step": step, "log": log}))  # fmt: skip

    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = 1, log: bool = False
    ) -> int:
        """An int parameter, as ``suggest_float`` (outside a trial: ``low``)."""
        kwargs = {"low": low, "high": high, "step": step, "log": log}
        return int(self._suggest("int", name, low, kwargs))

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        """One of ``choices`` (outside a trial: the first)."""
        return self._suggest("categorical", name, list(choices)[0], {"choices": list(choices)})

    def _suggest(self, kind: str, name: str, outside: Any, kwargs: dict[str, Any]) -> Any:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"trial().suggest_{kind}: a name without dots, got {name!r}")
        if self._link is None:
            return _replayed.get(name, outside)
        return self._link.suggest(kind, name, kwargs)


def load_best(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``cfg`` of a file ``hpo-inspect STUDY --best-config FILE`` wrote, ready for a final
    run of the session outside a study: from now on, in this process, ``trial().suggest_*``
    outside a trial returns the values the best trial's session asked for itself (kept in the
    file under ``hpo_suggested``, which is not part of the returned cfg)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a cfg mapping (write it with hpo-inspect --best-config)")
    suggested = cfg.pop(SUGGESTED_KEY, None) or {}
    if not isinstance(suggested, dict):
        raise ValueError(f"{path}: {SUGGESTED_KEY}: must be a mapping of name: value")
    _replayed.clear()
    _replayed.update(suggested)
    return cfg


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
