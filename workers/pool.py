"""Several worker processes on one host (``--processes N``, or one per GPU with ``--gpus``).

The parent supervises (after rq's ``WorkerPool``): children are forked from a parent that has
imported the framework but opened no connection, each in its own process group, so a
terminal's Ctrl-C reaches the parent alone and is forwarded once. The first SIGTERM/SIGINT is
a warm stop, the second a cold one. A child that dies while the pool is not stopping (OOM kill,
segfault, ``kill -9``) is started again in its slot, with a backoff that grows while it keeps
dying young. The pool's exit status is the worst of its children's last ones (0: every worker
stopped cleanly; 1: a cold stop abandoned a trial; 128+N: a worker was killed by signal N).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from hpo_framework.runtime import forkserver
from hpo_framework.runtime.executor import preload_modules
from hpo_framework.runtime.forkserver import ForkServer
from hpo_framework.runtime.serving import die_with_parent
from workers.worker import run_worker

log = logging.getLogger("hpo.pool")

#: A child that lived at least this long before dying restarts at once; younger deaths back off.
HEALTHY_AFTER_S = 30.0
BACKOFF_MAX_S = 30.0


def _child(
    url: str, gpu: str | None, kwargs: dict[str, Any], parent: int,
    forks: ForkServer | None, connection: socket.socket | None,
) -> None:  # fmt: skip
    os.setpgid(0, 0)  # a group of its own: only the parent forwards signals to it
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    # A pool killed with -9 leaves no unsupervised workers: each finishes its trial and exits.
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        sys.exit(0)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if forks is not None:
        forks.forget()  # the pool's connection to the server stays the pool's
    if connection is not None:
        forkserver.attach(connection)
    sys.exit(run_worker(url, **kwargs))


@dataclass
class _Slot:
    index: int
    gpu: str | None
    process: BaseProcess | None = None
    started: float = 0.0
    backoff: float = 0.0
    restart_at: float | None = None
    exit_status: int = 0
    deaths: list[int] = field(default_factory=list)


def _status(exitcode: int | None) -> int:
    if exitcode is None:
        return 1
    return 128 - exitcode if exitcode < 0 else exitcode


def run_pool(url: str, processes: int, gpus: Sequence[str] | None, **kwargs: Any) -> int:
    ctx = multiprocessing.get_context("fork")
    slots = [_Slot(i, gpu) for i, gpu in enumerate(list(gpus) if gpus else [None] * processes)]
    signals_received = 0
    forks = None
    if forkserver.enabled():
        try:
            forks = ForkServer(preload_modules())
        except OSError as e:  # its workers start their executors themselves
            log.warning("cannot start the pool's fork server (%s)", e)

    def start(slot: _Slot) -> None:
        connection = forks.connect() if forks is not None else None
        slot.process = ctx.Process(
            target=_child,
            args=(url, slot.gpu, kwargs, os.getpid(), forks, connection),
            name=f"hpo-worker-{slot.index}",
        )
        try:
            slot.process.start()
        finally:
            if connection is not None:
                connection.close()  # the child's now
        with contextlib.suppress(OSError):  # also here: no window before the child's own call
            os.setpgid(slot.process.pid or 0, slot.process.pid or 0)
        slot.started, slot.restart_at = time.monotonic(), None

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal signals_received
        signals_received += 1
        for slot in slots:
            if slot.process is not None and slot.process.is_alive():
                assert slot.process.pid is not None
                os.kill(slot.process.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for slot in slots:
            start(slot)
        log.info(
            "started %d worker processes%s",
            len(slots),
            f" on GPUs {','.join(gpus)}" if gpus else "",
        )
        while True:
            running = [s for s in slots if s.process is not None]
            waiting = [s for s in slots if s.restart_at is not None]
            if not running and not waiting:
                break
            now = time.monotonic()
            for slot in waiting:
                if signals_received:
                    slot.restart_at = None
                elif now >= (slot.restart_at or now):
                    log.info("restarting worker process %d", slot.index)
                    start(slot)
            sentinels = [s.process.sentinel for s in slots if s.process is not None]
            multiprocessing.connection.wait(sentinels, timeout=0.5)
            for slot in slots:
                proc = slot.process
                if proc is None or proc.is_alive():
                    continue
                proc.join()
                slot.process, slot.exit_status = None, _status(proc.exitcode)
                if proc.exitcode == 0 or signals_received:
                    continue  # a clean exit (--idle-exit) or part of the stop
                lived = time.monotonic() - slot.started
                slot.backoff = 0.0 if lived >= HEALTHY_AFTER_S else min(
                    BACKOFF_MAX_S, max(1.0, slot.backoff * 2)
                )  # fmt: skip
                slot.restart_at = time.monotonic() + slot.backoff
                slot.deaths.append(slot.exit_status)
                log.error(
                    "worker process %d (pid %s) died with status %d; restarting in %.0fs",
                    slot.index, proc.pid, slot.exit_status, slot.backoff,
                )  # fmt: skip
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if forks is not None:
            forks.close()
    return max((slot.exit_status for slot in slots), default=0)
