"""The worker loop: wait for studies, run their trials, survive everything but a second signal.

Shape (after rq's worker): bootstrap (wait for the schema) -> install signal handlers ->
``while not stopping``: refresh the open studies -> sweep stale trials -> claim and run one
trial per study -> back off when idle; teardown in ``finally``.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from types import FrameType
from typing import Any

import optuna

from hpo_framework.runtime import health
from hpo_framework.runtime.serving import (
    FAILED,
    TRANSIENT_ERRORS,
    Backend,
    CannotServeHere,
    Heartbeat,
    InvalidStudy,
    Presence,
    ProcessExecutor,
    Registry,
    StorageError,
    StudyHandle,
    StudyRecord,
    Sweeper,
    bound_retries_for_stop,
    defaults,
    is_server_full,
    load_for_serving,
    note_cannot_serve,
    open_storage,
    redact,
    schema_exists,
    scrub,
    worker_id,
)

log = logging.getLogger("hpo.worker")

#: Exit status after a second signal abandoned the running trial.
COLD_EXIT = 1


class ColdShutdown(BaseException):
    """Raised in the main thread by a worker's second SIGTERM/SIGINT to abandon the trial now;
    the trial path fails the trial with this message and re-queues its point.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` can swallow it.
    """

    def __init__(self) -> None:
        super().__init__("worker stopped by a second signal")


class Worker:
    """One worker process. ``run`` returns its exit status."""

    def __init__(
        self, url: str, *, study: str | None = None, idle_exit: float | None = None,
        executor: ProcessExecutor | None = None,
    ) -> None:  # fmt: skip
        self.url = url
        self.study_filter = study
        self.idle_exit = idle_exit
        self.id = worker_id()
        self._stopping = False
        self._wake = threading.Event()
        self._handles: dict[int, StudyHandle] = {}
        self._broken: set[int] = set()
        self._sweeper: Sweeper | None = None
        self._executor = executor or ProcessExecutor()
        self.health_file = health.health_file()

    # --- signals: warm on the first, cold on the second -----------------------------------------

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping:
            log.warning("worker %s: second signal, abandoning the running trial", self.id)
            raise ColdShutdown()
        self._stopping = True
        bound_retries_for_stop()
        self._wake.set()
        log.info(
            "worker %s: %s received, finishing the running trial (again to abort it)",
            self.id, signal.Signals(signum).name,
        )  # fmt: skip

    def run(self) -> int:
        previous = {
            s: signal.signal(s, self.request_stop) for s in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self._executor.start(wait=False)  # imports in parallel with the wait for the database
            storage = self._wait_for_schema()
            if storage is None:
                return 0
            presence = Presence(storage.engine, self.id, self.study_filter)
            presence.register()
            with Heartbeat(storage, presence, self.health_file) as heartbeat:
                self._loop(Backend(storage), heartbeat)
            presence.leave()
            log.info("worker %s: stopped", self.id)
            return 0
        except ColdShutdown:
            return COLD_EXIT
        except StorageError as e:
            log.error("worker %s: %s", self.id, e)
            return 1
        finally:
            self._executor.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # --- bootstrap ----------------------------------------------------------------------------

    def _wait_for_schema(self) -> optuna.storages.RDBStorage | None:
        """Workers never create tables: they wait until the coordinator has (Optuna #1092)."""
        where = redact(self.url)
        next_log = 0.0
        unreachable_since: float | None = None
        full_wait, said_full = 1.0, False
        while not self._stopping:
            pause = 1.0
            try:
                if schema_exists(self.url):
                    return open_storage(self.url, create_schema=False, role="hpo-worker")
                # Waiting for the coordinator is not idleness: --idle-exit does not count it
                # (a coordinator slower than --idle-exit must not leave its study unserved).
                reason, unreachable_since = (
                    "no study created yet (run hpo-coordinator create)",
                    None,
                )
            except (*TRANSIENT_ERRORS, StorageError) as e:  # type: ignore[misc]
                if is_server_full(e):
                    # Up, with every connection taken (more workers than max_connections):
                    # one frees as others finish. Neither unreachable nor idle; backoff with
                    # jitter, so that the waiting workers do not all knock at once.
                    reason, unreachable_since = (
                        "the database has no free connection (max_connections reached); "
                        "waiting for one", None,
                    )  # fmt: skip
                    if not said_full:
                        log.warning("worker %s: %s", self.id, reason)
                        said_full, next_log = (
                            True,
                            time.monotonic() + defaults.SCHEMA_WAIT_LOG_EVERY,
                        )
                    pause = full_wait * (0.5 + random.random())
                    full_wait = min(full_wait * 2, 10.0)
                else:
                    # Not up yet, restarting, refusing connections: all are waited out.
                    text = scrub(self.url, " ".join(str(e).split()))[:200]
                    reason = f"database unreachable: {text}"
                    unreachable_since = unreachable_since or time.monotonic()
            health.write(self.health_file, database_ok=unreachable_since is None)
            if time.monotonic() >= next_log:
                log.info("worker %s: waiting for %s: %s", self.id, where, reason)
                next_log = time.monotonic() + defaults.SCHEMA_WAIT_LOG_EVERY
            if unreachable_since is not None and self._idle_expired(unreachable_since):
                raise StorageError(f"{where}: {reason} (for over --idle-exit {self.idle_exit}s)")
            self._wake.wait(pause)
        return None

    # --- the loop -----------------------------------------------------------------------------

    def _loop(self, backend: Backend, heartbeat: Heartbeat) -> None:
        registry, tickets = backend.registry, backend.tickets
        self._sweeper = Sweeper(backend, self.id, defaults.SWEEP_INTERVAL_S)
        # --study NAME that does not exist yet: waiting for its coordinator is not idleness
        awaited = self.study_filter is not None and not self._check_study_filter(registry)
        idle_since = time.monotonic()
        wait = defaults.IDLE_POLL_MIN
        waiting_said = ""
        while not self._stopping:
            self._sweeper.sweep()  # every study, whatever its state
            records = registry.open()
            if self.study_filter is not None:
                records = [r for r in records if r.name == self.study_filter]
                if awaited and (records or self._study_exists(registry)):
                    awaited, idle_since = False, time.monotonic()
                    log.info("worker %s: study %r is there now", self.id, self.study_filter)
            self._forget_closed(registry, {r.study_id for r in records})
            worked = False
            for record in records:
                if self._stopping:
                    break
                if not record.claimable:  # its session is not even imported
                    continue
                handle = self._handle(backend, record)
                if handle is None:
                    continue
                # Serve this study while it has budget; re-list studies at least every second
                # so that several open studies are all served.
                try:
                    ran, broken = handle.run_trials(
                        heartbeat, stopping=lambda: self._stopping, until=time.monotonic() + 1.0
                    )
                except KeyError:  # deleted under us (optuna delete-study): its ticket is swept
                    self._deleted(record)
                    continue
                worked = worked or ran > 0
                if broken is not None:
                    self._drop(record, str(broken.error))
            if worked:
                idle_since, wait, waiting_said = time.monotonic(), defaults.IDLE_POLL_MIN, ""
                continue
            why = self._why_waiting(records, awaited)
            if why != waiting_said:
                log.info("worker %s: waiting for work (%s)", self.id, why)
                waiting_said = why
            if awaited:
                idle_since = time.monotonic()
            elif self._idle_expired(idle_since):
                # Trials still in flight may fail and hand their tickets back, or belong to a
                # lost worker this one must recover: idle means none is left anywhere.
                if tickets.held() > 0:
                    idle_since = time.monotonic() - self.idle_exit / 2  # type: ignore[operator]
                else:
                    log.info("worker %s: idle for %ss, exiting", self.id, self.idle_exit)
                    return
            self._wake.wait(wait)
            wait = min(wait * 2, defaults.IDLE_POLL_MAX)

    def _handle(self, backend: Backend, record: StudyRecord) -> StudyHandle | None:
        """The loaded study, loading it on first sight; None for a study this worker can't run."""
        if record.study_id in self._broken:
            return None
        handle = self._handles.get(record.study_id)
        if handle is not None:
            handle.record = record
            return handle
        try:
            handle = load_for_serving(backend, record, self._executor, self.id, self._sweeper)
        except KeyError:  # deleted a moment ago
            self._deleted(record)
            return None
        except InvalidStudy as e:  # invalid on every host: the study fails
            self._broken.add(record.study_id)
            error = f"worker {self.id}: {e}"
            log.error("worker %s: cannot serve study %r: %s", self.id, record.name, e)
            backend.registry.set_state(record.name, FAILED, error)
            return None
        except CannotServeHere as e:  # this host's problem: skip it, say why, serve the others
            self._broken.add(record.study_id)
            log.error(
                "worker %s: cannot serve study %r on this host, skipping it: %s",
                self.id, record.name, e,
            )  # fmt: skip
            note_cannot_serve(backend, record, self.id, str(e))
            return None
        log.info(
            "worker %s: serving study %r (session %s)", self.id, record.name, record.session_ref
        )
        self._handles[record.study_id] = handle
        return handle

    def _forget_closed(self, registry: Registry, open_ids: set[int]) -> None:
        """Drop the loaded studies that are no longer open (stopped, failed or deleted)."""
        for study_id in set(self._handles) - open_ids:
            handle = self._handles.pop(study_id)
            if registry.by_id(study_id) is None:
                self._deleted(handle.record)

    def _deleted(self, record: StudyRecord) -> None:
        log.warning(
            "worker %s: study %r was deleted (by Optuna's own tools?); no longer serving it",
            self.id, record.name,
        )  # fmt: skip
        self._broken.add(record.study_id)
        self._handles.pop(record.study_id, None)

    def _drop(self, record: StudyRecord, error: str) -> None:
        log.error("worker %s: study %r failed: %s", self.id, record.name, error)
        self._broken.add(record.study_id)
        self._handles.pop(record.study_id, None)

    def _why_waiting(self, records: list[StudyRecord], awaited: bool) -> str:
        """What the waiting line says: the study --study waits for, the open studies with
        budget left that this host cannot serve, or that there is none."""
        if awaited:
            return f"no study named {self.study_filter!r} yet; waiting for it to be created"
        skipped = [r.name for r in records if r.claimable and r.study_id in self._broken]
        if skipped:
            names = ", ".join(repr(n) for n in skipped)
            return f"open studies this host cannot serve: {names}; hpo-inspect NAME says why"
        return "no open study with budget left"

    def _study_exists(self, registry: Registry) -> bool:
        name = self.study_filter or ""
        return registry.find(name) is not None

    def _check_study_filter(self, registry: Registry) -> bool:
        """Whether the study --study names exists; if not, say so once with the names there
        are (the worker then waits for it)."""
        if self._study_exists(registry):
            return True
        names = [r.name for r in registry.all()]
        log.warning(
            "worker %s: no study named %r (yet); studies here: %s", self.id,
            self.study_filter, ", ".join(repr(n) for n in names) or "none",
        )  # fmt: skip
        return False

    def _idle_expired(self, since: float) -> bool:
        return self.idle_exit is not None and time.monotonic() - since >= self.idle_exit


def run_worker(url: str, **kwargs: Any) -> int:
    return Worker(url, **kwargs).run()
