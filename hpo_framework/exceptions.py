"""The framework's exceptions: one root, each class saying when it is raised."""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna


class HPOError(Exception):
    """Root of every error the framework raises on purpose."""

    #: Exit status the command-line tools use for this error.
    exit_code = 1


class ConfigError(HPOError):
    """Raised when config.yaml (or a study's stored config) is missing, malformed or invalid.

    The message is one line: ``<file>: <key.path>: <reason>``.
    """

    exit_code = 2

    def __init__(self, source: str, key: str | None, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + reason)


class HostConfigError(ConfigError):
    """A config error that is the host's, not the study's: a worker skips the study and other
    hosts may serve it."""


class MissingPackageError(HostConfigError):
    """Raised when the config needs a Python package this host does not have (e.g. torch for
    the ``gp`` sampler)."""


class UnsafeSamplerError(HostConfigError):
    """Raised for a sampler that unpickles state read from the database (``cmaes``) on a host
    whose operator has not said that only trusted parties can write the database."""


class NotAllowedHereError(HostConfigError):
    """Raised when the config asks for what this host's operator has not allowed: an S3
    endpoint outside ``HPO_S3_ENDPOINTS``, a checkpoint location outside
    ``HPO_CHECKPOINT_LOCATIONS`` (see ``host_policy``)."""


class StorageError(HPOError):
    """Raised when the storage cannot be reached or used (bad URL, database gone too long)."""


class StudyExistsError(HPOError):
    """Raised when creating a study whose name is taken (and ``resume`` does not apply)."""

    exit_code = 2


class OperationError(HPOError):
    """Raised when an operation on an existing study is refused: its state does not allow it
    (resume a study that is not paused), or its budget (n_trials below the trials taken,
    more points than it has room for). The message says why and what to do instead."""

    exit_code = 2


class StudyNotFoundError(HPOError):
    """Raised when a command names a study that is not in the storage."""


class SessionError(HPOError):
    """Raised when a session reference cannot be imported, or a session returns a bad value."""


if TYPE_CHECKING:

    class TrialPruned(HPOError, optuna.TrialPruned):
        """Raised by :func:`hpo_framework.report` when the pruner stops the running trial."""


_DEFINING = threading.Lock()


@functools.cache
def _define_trial_pruned() -> type[HPOError]:
    # Made on first use: it subclasses Optuna's, and importing Optuna costs the read side
    # (hpo-inspect) more than everything else it does.
    import optuna

    class TrialPruned(HPOError, optuna.TrialPruned):
        """Raised by :func:`hpo_framework.report` when the pruner stops the running trial.

        Sessions never need to catch it; it also is an :class:`optuna.TrialPruned`.
        """

    TrialPruned.__module__, TrialPruned.__qualname__ = __name__, "TrialPruned"  # pickles
    return TrialPruned


def __getattr__(name: str) -> Any:
    if name == "TrialPruned":
        with _DEFINING:  # one class, even when two threads ask first at once
            cls = globals()[name] = _define_trial_pruned()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TrialLost(HPOError):
    """Raised inside a trial whose row was failed by another worker (its heartbeat went stale).

    The trial's parameters are already being evaluated again elsewhere; this result is dropped.
    """
