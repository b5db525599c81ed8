"""What a worker process is built from: the library's surface for the ``workers`` package.

``workers`` owns the process (signals, the polling loop, ``--processes``); everything it does
to a study goes through the names here. Loading a study for serving draws the line between a
study that is invalid everywhere (its stored config fails the checks: the study is failed) and
one this host cannot serve (the session does not import here: the worker skips it and says why,
per worker, where ``hpo-inspect`` shows it).
"""

from __future__ import annotations

import zlib

from hpo_framework import defaults
from hpo_framework.config.schema import Config
from hpo_framework.exceptions import HostConfigError, HPOError, StorageError
from hpo_framework.runtime.executor import ProcessExecutor, die_with_parent
from hpo_framework.runtime.heartbeat import Heartbeat
from hpo_framework.runtime.recovery import Sweeper
from hpo_framework.runtime.trials import StudyHandle, open_study
from hpo_framework.storage.backend import Backend
from hpo_framework.storage.database import (
    TRANSIENT_ERRORS,
    bound_retries_for_stop,
    is_server_full,
    open_storage,
    redact,
    schema_exists,
    scrub,
)
from hpo_framework.storage.presence import Presence, worker_id
from hpo_framework.storage.registry import FAILED, Registry, StudyRecord
from hpo_framework.storage.trial_attrs import CANNOT_SERVE_PREFIX

__all__ = [
    "worker_id",
    "Backend",
    "FAILED",
    "TRANSIENT_ERRORS",
    "CannotServeHere",
    "Heartbeat",
    "InvalidStudy",
    "Presence",
    "ProcessExecutor",
    "Registry",
    "StorageError",
    "StudyHandle",
    "StudyRecord",
    "Sweeper",
    "defaults",
    "die_with_parent",
    "bound_retries_for_stop",
    "is_server_full",
    "load_for_serving",
    "note_cannot_serve",
    "open_storage",
    "redact",
    "schema_exists",
    "scrub",
]


class InvalidStudy(HPOError):
    """The stored study cannot be served anywhere (its config fails the checks)."""


class CannotServeHere(HPOError):
    """This host cannot serve the study (its session does not import here); others may."""


def load_for_serving(
    backend: Backend,
    record: StudyRecord,
    executor: ProcessExecutor,
    worker_id: str,
    sweeper: Sweeper | None = None,
) -> StudyHandle:
    """The study, ready to run trials in this worker; InvalidStudy or CannotServeHere if not."""
    try:
        config = Config.stored(record.name, record.config, serving=True)
        if not record.session_ref:
            raise HPOError(f"study {record.name!r} has no session reference")
    except HostConfigError as e:  # e.g. no torch here for the gp sampler
        raise CannotServeHere(str(e)) from e
    except HPOError as e:
        raise InvalidStudy(str(e)) from e
    try:  # what fails here may be this host's (modules allowed, packages, a GPU)
        executor.check(record.session_ref)
        return open_study(
            backend, record, config, executor,
            worker_id=worker_id, worker_index=zlib.crc32(worker_id.encode()), sweeper=sweeper,
        )  # fmt: skip
    except (HPOError, ImportError) as e:
        raise CannotServeHere(str(e)) from e


def note_cannot_serve(backend: Backend, record: StudyRecord, worker_id: str, reason: str) -> None:
    """Record, per worker, why this worker skips the study (``hpo-inspect STUDY`` shows it)."""
    backend.set_study_attr(record.study_id, f"{CANNOT_SERVE_PREFIX}{worker_id}", reason[:1000])
