"""Day-2 operations on an existing study: change its limits, pause, resume, reopen, re-queue.

Each is one conditional write (or a short locked transaction) on ``hpo_studies``, so it is
safe beside running workers and another operator: workers read the study's row before every
claim, so a change takes effect at their next poll. What a study *is* (its search space, its
static values, its session) never changes here: that is a new study.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from hpo_framework._checks import Checker
from hpo_framework.config.schema import Config
from hpo_framework.exceptions import OperationError
from hpo_framework.param_sampler import SearchSpace
from hpo_framework.runtime.hooks import rearm
from hpo_framework.storage.registry import (
    FAILED,
    OPEN,
    PAUSED,
    STOPPED,
    Registry,
    StudyRecord,
    hpo_studies,
    study_lock,
)
from hpo_framework.storage.trial_attrs import (
    ATTEMPT_ATTR,
    COPIED_FROM_ATTR,
    REOPENED_ATTR,
    REQUEUED_FROM_ATTR,
    RETRY_OF_ATTR,
)
from hpo_framework.storage.trial_store import create_trial_once

#: The study's limits, which may change while it runs (``set``, or ``create --resume`` with a
#: config that differs only in these).
LIMITS = ("n_trials", "timeout", "max_failed_trials", "max_retries")


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    return "none" if value is None else str(value)


# --- limits -------------------------------------------------------------------------------------


def identity(raw: Mapping[str, Any]) -> dict[str, Any]:
    """What a study is, without its limits and where it is stored: two configs with the same
    identity describe the same study, whatever their budgets."""
    same = {k: v for k, v in raw.items() if k != "storage"}
    same["study"] = {k: v for k, v in dict(raw.get("study") or {}).items() if k not in LIMITS}
    return same


def set_limits(
    storage: optuna.storages.RDBStorage, name: str, limits: Mapping[str, Any]
) -> list[Change]:
    """Change the study's ``LIMITS`` (a key missing from ``limits`` keeps its value).

    ``n_trials`` may not go below the trials finished or running (their tickets are taken);
    ``timeout`` counts from now; ``none`` lifts a limit. Returns what changed.
    """
    unknown = set(limits) - set(LIMITS)
    if unknown:
        raise OperationError(
            f"cannot change {', '.join(sorted(unknown))}: only {', '.join(LIMITS)}"
        )
    registry = Registry(storage.engine)
    for _ in range(_OPTIMISTIC_TRIES):
        changes = _write_limits(storage, registry, name, limits)
        if changes is not None:
            return changes
    raise OperationError(f"study {name!r} kept changing meanwhile; try again")


#: How often ``set`` reads the study again when another operator changed it meanwhile.
_OPTIMISTIC_TRIES = 5


def _write_limits(
    storage: optuna.storages.RDBStorage, registry: Registry, name: str, limits: Mapping[str, Any]
) -> list[Change] | None:
    """One read-change-write of the stored config, conditional on it being unchanged since
    the read; None if another operator changed it first (read it again)."""
    record = registry.get(name)
    raw = json.loads(json.dumps(record.config))  # a deep copy
    before = Config.stored(name, record.config).study
    changes = [  # a timeout counts from now: given again, it restarts
        Change(k, getattr(before, k), v)
        for k, v in limits.items()
        if getattr(before, k) != v or (k == "timeout" and v is not None)
    ]
    if not changes:
        return []
    raw.setdefault("study", {}).update(limits)
    config = Config.from_mapping(raw, f"study {name!r}")  # every value checked as in a file
    budget = config.budget
    c = hpo_studies.c
    values: dict[str, Any] = {
        "budget": budget,
        "max_failures": config.study.max_failed_trials,
        "config_json": json.dumps(raw),
        "config_hash": config.hash,
    }
    if "timeout" in limits:
        timeout = config.study.timeout
        values["deadline"] = None if timeout is None else registry.clock + timeout
    unchanged = sa.and_(c.study_id == record.study_id, c.config_hash == record.config_hash)
    stmt = hpo_studies.update().where(unchanged).values(**values)
    if budget is not None:  # never below the tickets taken: those trials run or ran
        stmt = stmt.where(c.claimed <= budget)
    with storage.engine.begin() as conn:
        if conn.execute(stmt).rowcount != 1:
            now = conn.execute(
                sa.select(c.claimed, c.config_hash).where(c.study_id == record.study_id)
            ).one()
            if now.config_hash != record.config_hash:
                return None
            raise OperationError(
                f"n_trials {budget} is below the {now.claimed} trials of study "
                f"{name!r} that finished or are running"
            )
    if {"n_trials", "timeout"} & set(limits):
        rearm(storage, record.study_id)  # a done study may go on: its hook may fire again
    return changes


# --- states -------------------------------------------------------------------------------------

#: operation -> (states it applies to, the state it leaves)
_MOVES = {
    "pause": ((OPEN,), PAUSED),
    "resume": ((PAUSED,), OPEN),
    "stop": ((OPEN, PAUSED), STOPPED),
    "reopen": ((STOPPED, FAILED), OPEN),
}
_HINTS = {
    (PAUSED, "reopen"): "it is paused: resume it",
    (STOPPED, "resume"): "it is stopped: reopen it",
    (FAILED, "resume"): "it failed: reopen it",
    (OPEN, "reopen"): "it is open already",
    (OPEN, "resume"): "it is not paused",
}


def move(
    storage: optuna.storages.RDBStorage, name: str, operation: str, reason: str | None = None
) -> StudyRecord:
    """Pause, resume, stop or reopen the study; returns its record as it was before.

    ``pause``: workers take no new trial, running trials finish. ``reopen`` (of a stopped or
    failed study) clears its error and failure count, restarts its ``timeout`` from now, and
    records ``reason`` in the study's user attribute ``hpo:reopened``.
    """
    registry = Registry(storage.engine)
    record = registry.get(name)
    allowed, to = _MOVES[operation]
    if record.state not in allowed:
        hint = _HINTS.get((record.state, operation), f"it is {record.state}")
        raise OperationError(f"cannot {operation} study {name!r}: {hint}")
    extra: dict[str, Any] = {}
    if operation == "reopen":
        timeout = Config.stored(name, record.config).study.timeout
        extra = {
            "error": None,
            "failures": 0,
            "deadline": None if timeout is None else registry.clock + timeout,
        }
    if not registry.move(name, record.state, to, **extra):
        raise OperationError(f"study {name!r} changed state meanwhile; look again (hpo-inspect)")
    if operation == "reopen":
        rearm(storage, record.study_id)
        history = storage.get_study_user_attrs(record.study_id).get(REOPENED_ATTR, [])
        history.append(
            {
                "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "was": record.state,
                "error": record.error,
                "reason": reason,
            }
        )
        storage.set_study_user_attr(record.study_id, REOPENED_ATTR, history)
    return record


# --- points ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _budget_room(
    storage: optuna.storages.RDBStorage, name: str
) -> Iterator[tuple[StudyRecord, int | None]]:
    """The study and how many more points its budget can take, with the study's row locked
    (PostgreSQL) until the block ends, so two operators never both fill the same room."""
    registry = Registry(storage.engine)
    record = registry.get(name)
    with study_lock(storage.engine, record.study_id):
        record = registry.by_id(record.study_id) or record
        waiting = len(
            storage.get_all_trials(record.study_id, deepcopy=False, states=(TrialState.WAITING,))
        )
        room = None if record.budget is None else max(0, record.budget - record.claimed - waiting)
        yield record, room


def enqueue_points(
    storage: optuna.storages.RDBStorage, name: str, points: Any, source: str
) -> int:
    """Add points (one mapping, nested like ``cfg``, or a list of them) to be evaluated next;
    each is checked against the study's search space. Refused past the budget."""
    listed = points if isinstance(points, list) else [points]
    with _budget_room(storage, name) as (record, room):
        space = Config.stored(name, record.config).search_space
        asked = _asked_distributions(storage, record.study_id, space)
        check = Checker(source)
        flat = [
            space.check_point(p, check.at(str(i)) if isinstance(points, list) else check, asked)
            for i, p in enumerate(listed)
        ]
        if room is not None and len(flat) > room:
            raise OperationError(
                f"{len(flat)} point(s) but the budget of study {name!r} leaves room for {room}; "
                "raise it first (hpo-coordinator set NAME --n-trials N)"
            )
        study = optuna.load_study(study_name=name, storage=storage)
        for point in flat:
            study.enqueue_trial(dict(point), skip_if_exists=False)
    return len(flat)


def _asked_distributions(
    storage: optuna.storages.RDBStorage, study_id: int, space: SearchSpace
) -> dict[str, BaseDistribution]:
    """The parameters the study's session asked for itself, each with the distribution of the
    last trial that asked for it (the ranges a session asks with may change with cfg)."""
    asked: dict[str, BaseDistribution] = {}
    for t in storage.get_all_trials(study_id, deepcopy=False):
        asked.update((k, d) for k, d in t.distributions.items() if k not in space)
    return asked


def retry_failed(storage: optuna.storages.RDBStorage, name: str) -> tuple[int, int]:
    """Re-queue the points of failed trials not re-queued yet, as far as the budget allows.

    Returns (re-queued, failed trials whose point was not re-queued yet)."""
    with _budget_room(storage, name) as (record, room):
        all_trials = storage.get_all_trials(record.study_id, deepcopy=False)
        requeued = {t.system_attrs.get(REQUEUED_FROM_ATTR) for t in all_trials}
        pending = [
            t for t in all_trials
            if t.state == TrialState.FAIL and t._trial_id not in requeued
            and (t.params or t.system_attrs.get("fixed_params"))
        ]  # fmt: skip
        chosen = pending if room is None else pending[:room]
        for failed in chosen:
            attempt = int(failed.user_attrs.get(ATTEMPT_ATTR, 0))
            retry = optuna.trial.create_trial(
                state=TrialState.WAITING,
                system_attrs={
                    "fixed_params": dict(failed.params or failed.system_attrs["fixed_params"]),
                    REQUEUED_FROM_ATTR: failed._trial_id,
                },
                user_attrs={
                    RETRY_OF_ATTR: failed.user_attrs.get(RETRY_OF_ATTR, failed.number),
                    ATTEMPT_ATTR: attempt + 1,
                },
            )
            create_trial_once(storage, record.study_id, retry)
    return len(chosen), len(pending)


# --- branching --------------------------------------------------------------------------------


def compatible_trials(
    storage: optuna.storages.RDBStorage, old_name: str, config: Config
) -> list[optuna.trial.FrozenTrial]:
    """The completed trials of study ``old_name`` that ``config``'s search space could have
    sampled, ready to add to its new study (``create --from OLD``): the same directions,
    each trial's parameters exactly those the new space has for that point, each value
    possible there. Their values are kept; they count towards the new budget."""
    if config.study.sampler.name == "grid":  # its grid would not count the copies as visited
        raise OperationError("create --from does not work with the grid sampler")
    registry = Registry(storage.engine)
    old = registry.get(old_name)
    old_config = Config.stored(old_name, old.config)
    directions = old_config.study.directions
    if directions != config.study.directions:
        raise OperationError(
            f"cannot copy trials of study {old_name!r}: its directions "
            f"({', '.join(directions)}) are not {', '.join(config.study.directions)}"
        )
    copies = []
    old_space, new_space = old_config.search_space, config.search_space
    for t in storage.get_all_trials(old.study_id, deepcopy=False, states=(TrialState.COMPLETE,)):
        # The search_space: part (old or new: a parameter the old session asked for may have
        # moved into YAML) must fit the new space; the rest, what the old session asked for
        # itself, keeps its recorded ranges (the new session asks the same way, or not at all).
        searched = {k: v for k, v in t.params.items() if k in old_space or k in new_space}
        distributions = new_space.distributions_of(searched)
        if distributions is None:
            continue
        distributions.update((k, d) for k, d in t.distributions.items() if k not in searched)
        copies.append(
            optuna.trial.create_trial(
                params=dict(t.params),
                distributions=distributions,
                values=list(t.values),
                user_attrs={COPIED_FROM_ATTR: f"{old_name}#{t.number}"},
            )  # fmt: skip
        )
    return copies
