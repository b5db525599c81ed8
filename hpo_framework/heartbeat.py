"""The heartbeat of the ticket a process holds, from its claim until it is settled.

Optuna's own heartbeat runs only inside ``study.optimize``; the pool uses ask/tell, so it keeps
its own: one thread per worker process that beats for whichever ticket the process holds,
writing the database's clock into the ticket row (``Tickets.beat``). Lost tickets are judged
and recovered in ``recovery``.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

import optuna

from hpo_framework.storage import DB_HEALTH, is_transient
from hpo_framework.tickets import Tickets

log = logging.getLogger("hpo.heartbeat")


class Heartbeat:
    """A context-managed thread recording the heartbeat of the trial this process runs."""

    def __init__(self, storage: optuna.storages.RDBStorage) -> None:
        self._tickets = Tickets(storage.engine)
        self._lock = threading.Lock()
        self._ticket: tuple[int, str] | None = None
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

    def track(self, ticket_id: int, worker: str, interval: float) -> None:
        """Beat for ``ticket_id`` (held by ``worker``) every ``interval`` seconds from now on.

        The claim itself was the first beat. The session runs in another process
        (``hpo_framework.executor``), so nothing it does can stop this thread.
        """
        with self._lock:
            self._ticket, self._interval = (ticket_id, worker), interval
        self._wake.set()  # the thread may be sleeping out an older, longer interval

    def untrack(self) -> None:
        with self._lock:
            self._ticket = None

    def _run(self) -> None:
        lost: int | None = None
        while not self._stop.is_set():
            with self._lock:
                ticket, interval = self._ticket, self._interval
            wait = interval
            if ticket is not None:
                try:
                    if not self._tickets.beat(*ticket) and lost != ticket[0]:
                        lost = ticket[0]
                        log.warning(
                            "ticket %d was recovered by another worker: this worker was "
                            "silent for longer than the grace period", ticket[0],
                        )  # fmt: skip
                    DB_HEALTH.ok()
                except Exception as e:
                    # Retried soon: the grace period is several beats long, and an outage
                    # must not outlast it here by a whole interval.
                    DB_HEALTH.failed()
                    wait = min(interval, 1.0)
                    why = "retrying" if is_transient(e) else "refused"
                    log.warning(
                        "heartbeat of ticket %d not recorded (%s): %s",
                        ticket[0], why, " ".join(str(e).split())[:200],
                    )  # fmt: skip
            self._wake.wait(timeout=wait)
            self._wake.clear()
