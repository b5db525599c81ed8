"""hpo: config-driven, distributed hyperparameter optimization on Optuna.

Write ``single_session(cfg: dict) -> float``, describe the search in config.yaml, and call
:func:`run_hpo` (one process) or run ``hpo-coordinator`` and ``hpo-worker`` (a pool).

The names below are imported on first use, so that a process which needs one module (the
executor that runs sessions, a command-line tool) does not pay for all of them; no module of
the package imports this face. ``checkpoint`` is the session's module of that name.

The package, by layer (a module imports only from its own layer and those before it; the
rules are checked by ``tests/unit/test_layers.py``):

- the foundation: ``exceptions``, ``defaults``, ``logs``, ``_checks``, ``_version``;
- ``config/`` and ``param_sampler``: what a study is, checked without a database;
- ``storage/``: every SQL statement and every Optuna-private table access, retries;
- ``session/``: the user's side of the executor boundary (``trial()``, ``report``,
  checkpoints, importing a session);
- ``views/``: the read side (summaries, the live view, plots, the dashboard);
- ``runtime/``: the one trial loop, the executor, heartbeat, settle, recovery, hooks;
- ``operations/`` and ``runner``: the coordinator's verbs, and ``run_hpo``;
- ``cli/``: click adapters only.

"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hpo_framework._version import __version__

_EXPORTS = {
    "Config": "hpo_framework.config.schema",
    "load_config": "hpo_framework.config.schema",
    "ConfigError": "hpo_framework.exceptions",
    "HPOError": "hpo_framework.exceptions",
    "SessionError": "hpo_framework.exceptions",
    "StorageError": "hpo_framework.exceptions",
    "StudyExistsError": "hpo_framework.exceptions",
    "StudyNotFoundError": "hpo_framework.exceptions",
    "TrialPruned": "hpo_framework.exceptions",
    "report": "hpo_framework.session.reporting",
    "trial": "hpo_framework.session.reporting",
    "load_best": "hpo_framework.session.reporting",
    "run_hpo": "hpo_framework.runner",
    "resolve_storage_url": "hpo_framework.storage.database",
    "unflatten": "hpo_framework.config.param_tree",
}

__all__ = [
    "Config",
    "ConfigError",
    "HPOError",
    "SessionError",
    "StorageError",
    "StudyExistsError",
    "StudyNotFoundError",
    "TrialPruned",
    "__version__",
    "checkpoint",
    "load_best",
    "load_config",
    "report",
    "resolve_storage_url",
    "run_hpo",
    "trial",
    "unflatten",
]

if TYPE_CHECKING:
    from hpo_framework.config.param_tree import unflatten
    from hpo_framework.config.schema import Config, load_config
    from hpo_framework.exceptions import (
        ConfigError,
        HPOError,
        SessionError,
        StorageError,
        StudyExistsError,
        StudyNotFoundError,
        TrialPruned,
    )
    from hpo_framework.runner import run_hpo
    from hpo_framework.session import checkpoint
    from hpo_framework.session.reporting import load_best, report, trial
    from hpo_framework.storage.database import resolve_storage_url


def __getattr__(name: str) -> Any:
    if name == "checkpoint":  # a module: checkpoint.save / checkpoint.load
        value = importlib.import_module("hpo_framework.session.checkpoint")
        globals()[name] = value
        return value
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hpo_framework' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
