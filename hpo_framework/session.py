"""The user's session function: found by reference, called, and its score checked.

The contract is ``single_session(cfg: dict) -> float`` (or a tuple of floats for several
directions). Everything the session does is its own business; what it returns is ours to check.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any

from hpo_framework import defaults
from hpo_framework.exceptions import SessionError

SessionFn = Callable[[dict[str, Any]], Any]


class ObjectiveCountError(SessionError):
    """Raised when a session returns a different number of values than there are directions.

    Unlike a NaN or an exception, this is the same for every trial: a configuration mistake.
    """


def allowed_modules() -> tuple[str, ...]:
    """Module prefixes sessions may come from: ``HPO_SESSION_MODULES`` or ``experiments``."""
    env = os.environ.get(defaults.SESSION_MODULES_ENV)
    if env is None:
        return defaults.SESSION_MODULES
    return tuple(p.strip() for p in env.split(",") if p.strip())


def import_session(ref: str, allowed: Sequence[str] | None = None) -> SessionFn:
    """Import ``package.module:function``, only from the allowed module prefixes.

    Workers read the reference from the database, so it is treated as untrusted: a reference
    outside the allowed prefixes is never imported at all.
    """
    allowed = allowed_modules() if allowed is None else tuple(allowed)
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise SessionError(f"session {ref!r}: must look like 'package.module:function'")
    if not any(module_name == p or module_name.startswith(p + ".") for p in allowed):
        raise SessionError(
            f"session {ref!r}: module {module_name!r} is outside the allowed prefixes "
            f"({', '.join(allowed) or 'none'}); set {defaults.SESSION_MODULES_ENV} to allow it"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:  # sessions live beside config.yaml, as with `python -m`
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any error of the user's module, reported with its reason
        raise SessionError(
            f"session {ref!r}: cannot import {module_name!r}: {type(e).__name__}: {e}"
        ) from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise SessionError(f"session {ref!r}: module {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise SessionError(f"session {ref!r}: {attr!r} is not callable")
    return fn  # type: ignore[no-any-return]


def check_result(result: Any, n_objectives: int) -> list[float]:
    """The session's return value as a list of finite floats, or SessionError saying why."""
    values = list(result) if isinstance(result, (list, tuple)) else [result]
    if len(values) != n_objectives:
        count = f"{len(values)} value{'' if len(values) == 1 else 's'}"
        raise ObjectiveCountError(
            f"session returned {count} but the study has {n_objectives} directions"
        )
    checked = []
    for v in values:
        # numpy and torch scalars are fine: anything that is a real number or converts to one.
        try:
            if isinstance(v, (bool, str, bytes)) or not (
                isinstance(v, Real) or hasattr(v, "__float__")
            ):
                raise TypeError
            f = float(v)
        except (TypeError, ValueError):
            text = repr(v)[:80]
            raise SessionError(
                f"session returned {text} ({type(v).__name__}), not a number"
            ) from None
        if not math.isfinite(f):
            raise SessionError(f"session returned {f}, not a finite number")
        checked.append(f)
    return checked
