"""Heartbeats of running trials, and failing the trials whose heartbeat stopped.

Optuna's own heartbeat runs only inside ``study.optimize``; the pool uses ask/tell, so it keeps
its own: one thread per worker process that beats for whichever trial the process is running.
Staleness is judged by the database's clock, never a worker's, and failing a stale trial is the
same conditional state change Optuna uses, so exactly one live worker wins each stale trial.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

import optuna
import sqlalchemy as sa

from hpo_framework.storage import TRANSIENT_ERRORS

log = logging.getLogger("hpo.heartbeat")

# The two columns of Optuna's tables the sweep reads (schema owned and versioned by Optuna).
_trials = sa.table(
    "trials", sa.column("trial_id"), sa.column("number"), sa.column("study_id"), sa.column("state")
)
_heartbeats = sa.table(
    "trial_heartbeats", sa.column("trial_id"), sa.column("heartbeat", sa.DateTime)
)


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
        """Beat for ``trial_id`` from now on, starting at once."""
        with self._lock:
            self._trial_id, self._interval = trial_id, interval
        self._wake.set()

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


class NullHeartbeat(Heartbeat):
    """The no-op twin, for in-memory storages where no other process can take over a trial."""

    def __init__(self) -> None:  # noqa: D107 - deliberately records nothing
        pass

    def __enter__(self) -> Heartbeat:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def track(self, trial_id: int, interval: float) -> None:
        pass

    def untrack(self) -> None:
        pass


def stale_trial_ids(storage: optuna.storages.RDBStorage, study_id: int, grace: float) -> list[int]:
    """Running trials of the study whose last heartbeat is older than ``grace`` seconds.

    The database's current time is read in the same query as the heartbeats it is compared to.
    Heartbeats are naive timestamps in the database session's time zone, as Optuna stores them.
    """
    now = sa.func.current_timestamp().label("now")
    query = (
        sa.select(_trials.c.trial_id, _heartbeats.c.heartbeat, sa.type_coerce(now, sa.DateTime))
        .join(_heartbeats, _heartbeats.c.trial_id == _trials.c.trial_id)
        .where(_trials.c.study_id == study_id, _trials.c.state == "RUNNING")
    )
    with storage.engine.connect() as conn:
        rows = conn.execute(query).all()
    stale = []
    for trial_id, beat, current in rows:
        if (current.replace(tzinfo=None) - beat.replace(tzinfo=None)).total_seconds() > grace:
            stale.append(int(trial_id))
    return stale
