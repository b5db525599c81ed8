"""Log set-up: one line per event with a stable prefix, to stderr."""

from __future__ import annotations

import logging
import sys

import optuna

FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


def ensure_console_logging(level: int = logging.INFO, prefix: str = "") -> None:
    """Give the ``hpo`` loggers a console handler unless the application configured one."""
    logger = logging.getLogger("hpo")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(prefix + FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    # Optuna's own per-trial INFO lines would repeat ours.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
