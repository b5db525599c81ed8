"""``hpo-coordinator dashboard``: optuna-dashboard over the shared storage, container-friendly.

Plain ``optuna-dashboard URL`` fails on a database no study was created in yet (Optuna's tables
are missing) and, as a container's PID 1, ignores SIGTERM. This starts it so that neither
happens: the tables are created the way the coordinator creates them (safe against a
coordinator doing the same at that moment), and SIGTERM/SIGINT end the server at once.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

from hpo_framework.exceptions import HPOError
from hpo_framework.storage.database import open_storage, redact


def serve(url: str, host: str, port: int) -> None:
    """Serve optuna-dashboard for every study in ``url`` until SIGTERM or SIGINT."""
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise HPOError(
            "optuna-dashboard is not installed: pip install 'hpo-framework[dashboard]'"
        ) from None
    storage = open_storage(url, create_schema=True, role="hpo-dashboard")

    def stop(signum: int, frame: FrameType | None) -> None:
        # Not sys.exit: wsgiref's handler catches every exception of a request being answered,
        # SystemExit included, and serves on (a SIGTERM mid-response was lost that way). The
        # server holds nothing to finish: an open transaction is rolled back by the database.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"optuna-dashboard for {redact(url)} on http://{host}:{port}/", flush=True)
    run_server(storage, host=host, port=port)
