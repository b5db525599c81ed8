"""hpo: config-driven, distributed hyperparameter optimization on Optuna.

Write ``single_session(cfg: dict) -> float``, describe the search in config.yaml, and call
:func:`run_hpo` (one process) or run ``hpo-coordinator`` and ``hpo-worker`` (a pool).
"""

from __future__ import annotations

__version__ = "0.1.0"

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
from hpo_framework.reporting import report
from hpo_framework.runner import run_hpo
from hpo_framework.storage import resolve_storage_url

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
    "load_config",
    "report",
    "resolve_storage_url",
    "run_hpo",
]
