"""Heartbeats of running trials, and failing the trials whose heartbeat stopped.

Optuna's own heartbeat runs only inside ``study.optimize``; the pool uses ask/tell, so it keeps
its own: one thread per worker process that beats for whichever trial the process is running.
Staleness is judged by the database's clock (see ``optuna_tables.stale_trial_ids``).
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

import optuna

from hpo_framework.storage import TRANSIENT_ERRORS

log = logging.getLogger("hpo.heartbeat")


class Heartbeat:
    """A context-managed thread recording the heartbeat of the trial this process runs."""

    def __init__(self, storage: optuna.storages.RDBStorage) -> None:
        self._storage = storage
        self._lock = threading.Lock()
        self._trial_id: int | None = None
        self._interval = 5.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpo-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def track(self, trial_id: int, interval: float) -> None:
        """Beat for ``trial_id`` every ``interval`` seconds from now on.

        The first beat is already there: ``Registry.cover_trial`` wrote it with the ticket.
        The session runs in another process (``hpo_framework.executor``), so nothing it does
        can stop this thread.
        """
        with self._lock:
            self._trial_id, self._interval = trial_id, interval
        self._wake.set()  # the thread may be sleeping out an older, longer interval

    def untrack(self) -> None:
        with self._lock:
            self._trial_id = None

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                trial_id, interval = self._trial_id, self._interval
            if trial_id is not None:
                try:
                    self._storage.record_heartbeat(trial_id)
                except TRANSIENT_ERRORS as e:
                    # The next beat retries; the grace period is several beats long.
                    log.warning("heartbeat of trial id %s not recorded: %s", trial_id, e)
            self._wake.wait(timeout=interval)
            self._wake.clear()
