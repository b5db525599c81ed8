"""A worker's health file: what ``hpo-worker --check`` (a container HEALTHCHECK, a Kubernetes
probe) reads, written by the worker itself while it lives.

The worker rewrites it at least every few seconds: from its heartbeat thread while it runs
(so a long trial does not look dead) and from its loop while it waits for the database. Alive
(``--check``): the file was written within ``HPO_HEALTH_MAX_AGE`` seconds (default 60), so the
process is neither gone nor frozen. Ready (``--check --ready``): alive, and its last database
step succeeded. A worker that waits for a database that is down is alive but not ready:
restarting it would not help, sending it work would not either.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

HEALTH_FILE_ENV = "HPO_HEALTH_FILE"
MAX_AGE_ENV = "HPO_HEALTH_MAX_AGE"


def health_file() -> Path:
    """``HPO_HEALTH_FILE``, default ``$TMPDIR/hpo-worker-<uid>.health`` (one per user: the
    processes of one pool share it)."""
    given = os.environ.get(HEALTH_FILE_ENV)
    if given:
        return Path(given)
    return Path(tempfile.gettempdir()) / f"hpo-worker-{os.getuid()}.health"


def write(path: Path, database_ok: bool) -> None:
    """Record that this process is alive now, and whether it reaches the database; never
    raises (health is no reason for a worker to stop)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump({"at": time.time(), "pid": os.getpid(), "database": database_ok}, f)
        os.replace(tmp, path)
    except OSError:
        pass


def problem(path: Path, ready: bool) -> str | None:
    """Why the worker is not alive (or, with ``ready``, not ready), or None."""
    max_age = float(os.environ.get(MAX_AGE_ENV, "60"))
    try:
        state = json.loads(path.read_text())
        age = time.time() - float(state["at"])
    except FileNotFoundError:
        return f"no health file {path} (no worker has run here yet)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable health file {path}: {e}"
    if age > max_age:
        return f"the worker last said it was alive {age:.0f}s ago (more than {max_age:g}s)"
    if ready and not state.get("database"):
        return "the worker is alive but does not reach the database"
    return None
