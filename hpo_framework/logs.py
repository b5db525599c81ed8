"""Log set-up: one line per event with a stable prefix, to stderr; or one JSON object a line."""

from __future__ import annotations

import json
import logging
import sys

FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors; a trial's fields are top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "hpo", {}))
        return json.dumps(entry, default=str)


def ensure_console_logging(level: int = logging.INFO, fmt: str = "text") -> None:
    """Give the ``hpo`` loggers a console handler unless the application configured one."""
    logger = logging.getLogger("hpo")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    # Optuna's own per-trial INFO lines would repeat ours.
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
