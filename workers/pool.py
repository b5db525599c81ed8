"""Several worker processes on one host (``--processes N``, or one per GPU with ``--gpus``).

Children are forked from a parent that has imported the framework but opened no connection,
so they start in milliseconds; each child builds its own storage. The parent forwards
SIGTERM/SIGINT (the first warm, the second cold) and exits with the worst child status.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from workers.worker import run_worker

log = logging.getLogger("hpo.worker")


def _child(url: str, gpu: str | None, kwargs: dict[str, Any]) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    sys.exit(run_worker(url, **kwargs))


def run_pool(url: str, processes: int, gpus: Sequence[str] | None, **kwargs: Any) -> int:
    slots: list[str | None] = list(gpus) if gpus else [None] * processes
    ctx = multiprocessing.get_context("fork")
    children = [
        ctx.Process(target=_child, args=(url, gpu, kwargs), name=f"hpo-worker-{i}")
        for i, gpu in enumerate(slots)
    ]
    for child in children:
        child.start()
    log.info(
        "started %d worker processes%s",
        len(children),
        f" on GPUs {','.join(gpus)}" if gpus else "",
    )

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for child in children:
            child.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [c.exitcode if c.exitcode is not None else 1 for c in children]
    return max((abs(c) for c in codes), default=0)
