"""The user's session function, found by reference (``package.module:function``).

The contract is ``single_session(cfg: dict) -> float`` (or a tuple of floats for several
directions). Where it runs and how its score is checked: ``hpo_framework.runtime.executor``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hpo_framework import defaults
from hpo_framework.exceptions import SessionError

SessionFn = Callable[[dict[str, Any]], Any]


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
    # A public function of an allowed module: not a class, not a builtin, not a function
    # imported there from elsewhere (the reference comes from the database, see Security).
    if attr.startswith("_") or not inspect.isfunction(fn):
        raise SessionError(f"session {ref!r}: {attr!r} is not a public function")
    defined_in = getattr(fn, "__module__", "") or ""
    if not any(defined_in == p or defined_in.startswith(p + ".") for p in allowed):
        raise SessionError(
            f"session {ref!r}: {attr!r} is defined in {defined_in!r}, outside the allowed "
            f"prefixes ({', '.join(allowed)})"
        )
    return fn
