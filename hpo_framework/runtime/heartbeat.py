"""The heartbeat of the ticket a process holds, from its claim until it is settled.

Optuna's own heartbeat runs only inside ``study.optimize``; the pool uses ask/tell, so it keeps
its own: one thread per worker process that beats for whichever ticket the process holds,
writing the database's clock into the ticket row (``Tickets.beat``). Lost tickets are judged
and recovered in ``recovery``.

A process has one pooled connection. While the main thread holds it, a due beat is handed
to the main thread, which writes it as it returns the connection to the pool (PostgreSQL):
a beat needs no second connection, which a full server (more workers than
``max_connections``) may not grant before the grace period ends. Only a beat still unwritten
at half the grace period opens a connection of its own.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import optuna
from sqlalchemy import event

from hpo_framework.runtime import health
from hpo_framework.storage.database import DB_HEALTH, is_server_full, is_transient
from hpo_framework.storage.presence import PRESENCE_EVERY_S, Presence
from hpo_framework.storage.tickets import Tickets

log = logging.getLogger("hpo.heartbeat")
_FAILING_SUMMARY_EVERY_S = 60.0  # while beats fail: one warning line a minute


class Heartbeat:
    """A context-managed thread recording the heartbeat of the trial this process runs."""

    def __init__(
        self,
        storage: optuna.storages.RDBStorage,
        presence: Presence | None = None,
        health_file: Path | None = None,
    ) -> None:
        self._tickets = Tickets(storage.engine)
        self._health_file = health_file  # hpo-worker --check reads it (``health``)
        self._presence = presence
        self._next_presence = time.monotonic() + PRESENCE_EVERY_S
        self._pool = storage.engine.pool
        self._lock = threading.Lock()
        self._ticket: tuple[int, str] | None = None
        self._fresh = False
        self._interval, self._grace = 5.0, 20.0
        self._last_beat = 0.0
        self._lost: int | None = None  # the ticket last found recovered by another worker
        self._missed: int | None = None  # the ticket the last beat found gone
        self._failing: tuple[float, int, float] | None = None  # since, attempts, last said at
        self._handoff: tuple[int, str] | None = None  # a due beat for the main thread to write
        self._hands_off = storage.engine.dialect.name == "postgresql"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpo-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        if self._hands_off:
            event.listen(self._pool, "checkin", self._beat_on_checkin)
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
        if self._hands_off:
            event.remove(self._pool, "checkin", self._beat_on_checkin)

    def track(self, ticket_id: int, worker: str, interval: float, grace: float) -> None:
        """Beat for ``ticket_id`` (held by ``worker``) every ``interval`` seconds from now on.

        The claim itself was the first beat. The session runs in another process
        (``hpo_framework.runtime.executor``), so nothing it does can stop this thread.
        """
        with self._lock:
            self._ticket, self._interval, self._grace = (ticket_id, worker), interval, grace
            # The claim was its first beat: the next is one interval away.
            self._fresh, self._last_beat = True, time.monotonic()
        self._wake.set()  # the thread may be sleeping out an older, longer interval

    def untrack(self) -> None:
        with self._lock:
            self._ticket = self._handoff = None

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                ticket, interval, fresh, self._fresh = (
                    self._ticket,
                    self._interval,
                    self._fresh,
                    False,
                )
            wait = interval
            since = time.monotonic() - self._last_beat
            if ticket is not None and not fresh and since < interval:
                wait = interval - since  # written meanwhile (handed over): not due yet
            elif ticket is not None and not fresh and self._defer():
                with self._lock:
                    self._handoff = ticket  # written as the main thread hands the connection back
                wait = min(interval, 0.2)  # soon again: the main thread may be done by then
            elif ticket is not None and not fresh:
                try:
                    self._recorded(ticket, self._tickets.beat(*ticket))
                except Exception as e:
                    # Retried soon: the grace period is several beats long, and an outage
                    # must not outlast it here by a whole interval.
                    self._not_recorded(ticket, e)
                    # No free connection on the server: the process's own pooled one is
                    # free again as soon as the main thread's statement ends.
                    wait = min(interval, 0.1 + 0.2 * random.random() if is_server_full(e) else 1.0)
            wait = min(wait, self._refresh_presence())
            if self._health_file is not None:
                health.write(self._health_file, DB_HEALTH.reachable)
                wait = min(wait, 5.0)
            self._wake.wait(timeout=wait)
            self._wake.clear()

    def _beat_on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        """The pool's ``checkin``: write a beat handed over while this connection was busy."""
        with self._lock:
            ticket, self._handoff = self._handoff, None
            if ticket is None or ticket != self._ticket or dbapi_connection is None:
                return
            if time.monotonic() - self._last_beat < self._interval:
                return  # the thread beat meanwhile
        try:
            owned = self._tickets.beat_on(dbapi_connection, *ticket)
        except BaseException as e:
            # The heartbeat thread tries again, on a connection of its own. This one goes
            # back to the pool only if it is sound and idle: a dead one, or one left inside
            # the beat's transaction by a signal (a second SIGTERM, Ctrl-C), is closed, so
            # its next use reconnects and no lock on the ticket's row outlives it.
            log.debug("heartbeat of ticket %d not written on checkin: %s", ticket[0], e)
            if isinstance(e, Exception) and not is_transient(e):
                try:
                    dbapi_connection.rollback()
                    return
                except Exception:
                    pass
            record.invalidate(e)
            if not isinstance(e, Exception):
                raise
            return
        # Not owned: settled by the statement this connection just ran, most likely (untrack
        # comes after it); a ticket truly recovered is found by the thread's next beat.
        if owned:
            self._recorded(ticket, owned)

    def _recorded(self, ticket: tuple[int, str], owned: bool) -> None:
        """A beat written (``owned``) or missed: the ticket was settled or taken over. The main
        thread stops tracking a ticket as soon as its result has settled it, so a beat may
        miss once in between; a ticket missed twice while still tracked was lost."""
        with self._lock:
            self._last_beat = time.monotonic()
            missed_before, self._missed = self._missed, None if owned else ticket[0]
            tracked = self._ticket == ticket
            lost = not owned and tracked and missed_before == ticket[0] and self._lost != ticket[0]
            if lost:
                self._lost = ticket[0]
            failing, self._failing = self._failing, None
        DB_HEALTH.ok()
        if lost:
            log.warning(
                "ticket %d was recovered by another worker: this worker was "
                "silent for longer than the grace period", ticket[0],
            )  # fmt: skip
        if failing is not None:
            log.warning(
                "heartbeat of ticket %d recorded again after %d failed attempt(s) "
                "over %.0fs", ticket[0], failing[1], time.monotonic() - failing[0],
            )  # fmt: skip

    def _not_recorded(self, ticket: tuple[int, str], error: Exception) -> None:
        """One line when beats start failing, then one a minute: not one a second."""
        DB_HEALTH.failed()
        now = time.monotonic()
        with self._lock:
            since, attempts, said = self._failing or (now, 0, 0.0)
            say = attempts == 0 or now - said >= _FAILING_SUMMARY_EVERY_S
            self._failing = (since, attempts + 1, now if say else said)
        if say:
            why = "retrying" if is_transient(error) else "refused"
            log.warning(
                "heartbeat of ticket %d not recorded (%s; %d attempt(s) over %.0fs): "
                "%s", ticket[0], why, attempts + 1, now - since,
                " ".join(str(error).split())[:200],
            )  # fmt: skip

    def _refresh_presence(self) -> float:
        """Refresh this worker's ``hpo_workers`` row when due; seconds until the next is due.
        Put off (a little) while the main thread holds the pooled connection, as beats are."""
        if self._presence is None:
            return PRESENCE_EVERY_S
        due = self._next_presence - time.monotonic()
        if due > 0:
            return due
        checked_out = getattr(self._pool, "checkedout", None)
        if checked_out is not None and checked_out() > 0 and due > -PRESENCE_EVERY_S:
            return 0.2
        try:
            self._presence.beat()
        except Exception as e:  # best effort: the next one may pass
            log.debug("presence not refreshed: %s", e)
        self._next_presence = time.monotonic() + PRESENCE_EVERY_S
        return PRESENCE_EVERY_S

    def _defer(self) -> bool:
        """Whether to put this beat off: the main thread holds the process's one pooled
        connection (say, waiting for Optuna's study lock to number a new trial) and the last
        beat is recent. A beat now would open a second connection to the server for one
        statement; 64 workers beating like that would not fit a stock PostgreSQL. Past half
        the grace period the beat goes out all the same, on a connection of its own."""
        checked_out = getattr(self._pool, "checkedout", None)
        busy = checked_out is not None and checked_out() > 0
        return busy and time.monotonic() - self._last_beat < self._grace / 2
