"""hpo: config-driven, distributed hyperparameter optimization on Optuna.

Write ``single_session(cfg: dict) -> float``, describe the search in config.yaml, and call
:func:`run_hpo` (one process) or run ``hpo-coordinator`` and ``hpo-worker`` (a pool).

The names below are imported on first use, so that a process which needs one module (the
executor that runs sessions, a command-line tool) does not pay for all of them, and no module
of the package imports the package itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "hpo_framework.config",
    "load_config": "hpo_framework.config",
    "ConfigError": "hpo_framework.exceptions",
    "HPOError": "hpo_framework.exceptions",
    "SessionError": "hpo_framework.exceptions",
    "StorageError": "hpo_framework.exceptions",
    "StudyExistsError": "hpo_framework.exceptions",
    "StudyNotFoundError": "hpo_framework.exceptions",
    "TrialPruned": "hpo_framework.exceptions",
    "report": "hpo_framework.reporting",
    "trial": "hpo_framework.reporting",
    "load_best": "hpo_framework.reporting",
    "run_hpo": "hpo_framework.runner",
    "resolve_storage_url": "hpo_framework.storage",
    "unflatten": "hpo_framework.param_sampler",
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
    "load_best",
    "load_config",
    "report",
    "resolve_storage_url",
    "run_hpo",
    "trial",
    "unflatten",
]

if TYPE_CHECKING:
    from hpo_framework.config import Config, load_config
    from hpo_framework.exceptions import (
        ConfigError,
        HPOError,
        SessionError,
        StorageError,
        StudyExistsError,
        StudyNotFoundError,
        TrialPruned,
    )
    from hpo_framework.param_sampler import unflatten
    from hpo_framework.reporting import load_best, report, trial
    from hpo_framework.runner import run_hpo
    from hpo_framework.storage import resolve_storage_url


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hpo_framework' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
