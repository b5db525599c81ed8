"""Which workers there are: each ``hpo-worker`` process registers itself in ``hpo_workers``
(host, pid, version, GPUs, what it serves), refreshes ``seen_at`` every few seconds from its
heartbeat thread, and removes its row when it stops cleanly. A row not refreshed for
``LOST_AFTER_S`` is a lost worker (killed, frozen, cut off); ``hpo-inspect --workers`` shows
both, with the trial each live one runs (from its ticket) and why it skips a study.
"""

from __future__ import annotations

import logging
import os
import socket

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from hpo_framework import defaults
from hpo_framework._version import __version__
from hpo_framework.storage.registry import db_now, hpo_workers

log = logging.getLogger("hpo.presence")


def worker_id() -> str:
    """This process's name among the workers (and in trials' ``worker`` attribute): host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


#: Seconds between two refreshes of a worker's row (env HPO_PRESENCE_INTERVAL).
PRESENCE_EVERY_S = defaults.PRESENCE_EVERY_S
#: A worker whose row is older than this is shown as lost.
LOST_AFTER_S = 3 * PRESENCE_EVERY_S
#: Rows of workers lost for longer than this are removed by the next worker that starts.
FORGET_AFTER_S = 7 * 24 * 3600.0


class Presence:
    """This worker process's row in ``hpo_workers``. Every method is best effort: a worker
    that cannot say it is there still serves its studies."""

    def __init__(self, engine: Engine, worker: str, serves: str | None) -> None:
        self.engine = engine
        self.worker = worker
        self.serves = serves or "all open studies"
        self._now = db_now(engine)
        self.ok = False

    def register(self) -> None:
        try:
            hpo_workers.create(self.engine, checkfirst=True)  # a schema older than this table
        except sa.exc.SQLAlchemyError:
            pass  # another worker created it this moment (or no right to: register fails)
        c = hpo_workers.c
        row = {
            "worker": self.worker, "host": socket.gethostname(), "pid": os.getpid(),
            "version": __version__, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "serves": self.serves[:300], "started_at": self._now, "seen_at": self._now,
        }  # fmt: skip
        try:
            with self.engine.begin() as conn:
                conn.execute(hpo_workers.delete().where(c.worker == self.worker))
                conn.execute(hpo_workers.delete().where(c.seen_at < self._now - FORGET_AFTER_S))
                conn.execute(hpo_workers.insert().values(**row))
            self.ok = True
        except sa.exc.SQLAlchemyError as e:
            log.warning("worker %s: not registered in hpo_workers: %s", self.worker, e)

    def beat(self) -> None:
        if not self.ok:
            return
        c = hpo_workers.c
        with self.engine.begin() as conn:
            conn.execute(
                hpo_workers.update().where(c.worker == self.worker).values(seen_at=self._now)
            )

    def leave(self) -> None:
        if not self.ok:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(hpo_workers.delete().where(hpo_workers.c.worker == self.worker))
        except sa.exc.SQLAlchemyError as e:
            log.warning("worker %s: its hpo_workers row stays (shown as lost): %s", self.worker, e)
