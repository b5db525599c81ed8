"""What hpo records on Optuna's trials and studies, shared by the trial path and the read side."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from hpo_framework.storage.trial_reads import TrialRecord

#: User attributes every trial carries (shown by hpo-inspect and optuna-dashboard).
WORKER_ATTR, ERROR_ATTR = "worker", "error"
#: The last lines of the traceback of a session that raised (hpo-inspect --trial shows it).
TRACEBACK_ATTR = "traceback"
RETRY_OF_ATTR, ATTEMPT_ATTR = "retry_of", "attempt"
#: A trial copied into a new study by ``create --from OLD``: ``"OLD#number"``.
COPIED_FROM_ATTR = "copied_from"
#: System attributes (hidden from users): the ticket a trial was created on, and the failed
#: trial a retry re-queues (what makes re-queueing idempotent).
TICKET_ATTR, REQUEUED_FROM_ATTR = "hpo:ticket", "hpo:requeued_from"
#: Study user attribute (+ worker id) a worker writes when it cannot serve the study on its host.
CANNOT_SERVE_PREFIX = "hpo:cannot_serve:"
#: Study user attribute: each reopening of a stopped or failed study, with its reason.
REOPENED_ATTR = "hpo:reopened"


def int_attr(attrs: dict[str, Any], key: str, default: int) -> int:
    """An integer attribute as hpo wrote it; ``default`` for anything else (attributes live in
    the database, where anyone who can write it may have put a string)."""
    value = attrs.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def trial_summary(trial: FrozenTrial | TrialRecord) -> dict[str, Any]:
    """The fields every trial listing shows, in one place."""
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    return {
        "number": trial.number,
        "state": getattr(trial.state, "name", trial.state),  # TrialState, or its name
        "values": trial.values,
        "params": trial.params,
        "worker": trial.user_attrs.get(WORKER_ATTR),
        "duration_s": duration,
        "error": trial.user_attrs.get(ERROR_ATTR),
        "retry_of": trial.user_attrs.get(RETRY_OF_ATTR),
        "started": trial.datetime_start,
    }


def cannot_serve(study_user_attrs: dict[str, Any]) -> dict[str, str]:
    """``{worker: reason}`` for the workers that skip a study on their host."""
    n = len(CANNOT_SERVE_PREFIX)
    return {
        k[n:]: str(v) for k, v in study_user_attrs.items() if k.startswith(CANNOT_SERVE_PREFIX)
    }
