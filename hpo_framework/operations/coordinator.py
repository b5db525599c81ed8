"""Creating, resuming, stopping and deleting studies: what ``hpo-coordinator`` does.

The coordinator is the only place that creates tables, so workers started on an empty
database never race to do it. A study becomes visible to workers (its ``hpo_studies`` row)
only after its Optuna study and its ``enqueue:`` points exist.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import optuna

from hpo_framework._version import __version__
from hpo_framework.config.schema import Config
from hpo_framework.exceptions import (
    ConfigError,
    SessionError,
    StudyExistsError,
    StudyNotFoundError,
)
from hpo_framework.operations.day2 import LIMITS, compatible_trials, identity, set_limits
from hpo_framework.runtime.hooks import fire_if_ended, rearm
from hpo_framework.session.reference import import_session
from hpo_framework.storage.backend import Backend
from hpo_framework.storage.database import redact
from hpo_framework.storage.registry import OPEN, PAUSED, STOPPED, Registry, StudyRecord

log = logging.getLogger("hpo.coordinator")


def create_study(
    storage: optuna.storages.RDBStorage,
    config: Config,
    *,
    resume: bool = False,
    check_session: bool = True,
    copy_from: str | None = None,
) -> StudyRecord:
    """Create the study of ``config`` (or resume it: same name and same config hash).

    ``check_session`` imports ``session:`` now, so a bad reference fails here and not in
    every worker. ``copy_from`` names a study whose completed trials that fit this search
    space are copied into the new one (warm start); they count towards its budget.
    """
    budget = check_config(config, check_session=check_session)
    registry = Registry(storage.engine)
    # The one step of the CLI that waits for the database: the coordinator (a Kubernetes Job,
    # a compose service) may start before the database does.
    Registry(storage.engine, patient=True).create_table()
    name = config.study.name
    copies = [] if copy_from is None else compatible_trials(storage, copy_from, config)
    if budget is not None and len(copies) + len(config.enqueue) > budget:
        raise ConfigError(
            config.source, "study.n_trials",
            f"{budget} leaves no room for the {len(copies)} trials copied from {copy_from!r}"
            + (f" and the {len(config.enqueue)} enqueued points" if config.enqueue else "")
            + "; raise it",
        )  # fmt: skip

    existing = registry.find(name)
    if existing is not None:
        return _resume(registry, existing, config, resume, storage)
    if name in {s.study_name for s in storage.get_all_studies()}:
        # Either another process is registering it this very moment, or plain Optuna made it.
        if resume and (record := _wait_registered(registry, name)) is not None:
            return _resume(registry, record, config, resume, storage)
        raise StudyExistsError(
            f"an Optuna study named {name!r} already exists in {redact(storage.url)} but was not "
            "created by hpo-coordinator; choose another study.name or --name"
        )
    try:
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            directions=[optuna.study.StudyDirection[d.upper()] for d in config.study.directions],
        )
    except optuna.exceptions.DuplicatedStudyError:
        # Another process created it a moment ago; with resume, join it once it is registered.
        if resume and (record := _wait_registered(registry, name)) is not None:
            return _resume(registry, record, config, resume, storage)
        raise StudyExistsError(f"study {name!r} was just created by someone else") from None
    # Short attributes for Optuna's own tools; the whole config lives in hpo_studies.
    study.set_user_attr("hpo_session", config.session)
    study.set_user_attr("hpo_config_hash", config.hash[:12])
    study.set_user_attr("hpo_version", __version__)
    for point in config.enqueue:
        study.enqueue_trial(dict(point))
    study.add_trials(copies)
    registry.add(
        claimed=len(copies),
        study_id=storage.get_study_id_from_name(name),
        name=name,
        budget=budget,
        max_failures=config.study.max_failed_trials,
        timeout=config.study.timeout,
        config=_without_secrets(config.raw),
        config_hash=config.hash,
        session_ref=config.session,
        version=__version__,
    )
    log.info("created study %r in %s (budget %s)", name, redact(storage.url), budget)
    return registry.get(name)


def _without_secrets(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The config as stored in the database: a ``storage:`` URL keeps no password there."""
    stored = dict(raw)
    if isinstance(stored.get("storage"), str):
        stored["storage"] = redact(stored["storage"])
    return stored


def _wait_registered(registry: Registry, name: str, seconds: float = 10.0) -> StudyRecord | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (record := registry.find(name)) is not None:
            return record
        time.sleep(0.1)
    return None


def _resume(
    registry: Registry,
    existing: StudyRecord,
    config: Config,
    resume: bool,
    storage: optuna.storages.RDBStorage,
) -> StudyRecord:
    name = config.study.name
    where = redact(storage.url)
    if not resume:
        raise StudyExistsError(
            f"study {name!r} already exists in {where}; use --resume to continue it with the "
            "same config, or --name to create another"
        )
    if existing.config_hash != config.hash:
        old, new = identity(existing.config), identity(config.raw)
        if old != new:
            raise StudyExistsError(
                f"study {name!r} in {where} was created from a different config "
                f"({', '.join(_differences(old, new))} differ); only {', '.join(LIMITS)} may "
                "change on an existing study; give this one another study.name (create --from "
                f"{name} copies the trials that fit it)"
            )
        limits = {k: getattr(config.study, k) for k in LIMITS}
        for change in set_limits(storage, name, limits):
            log.info("study %r: %s", name, change)
    if existing.state != PAUSED:  # a pause is lifted by resume only
        registry.reopen(name, config.study.timeout)
    rearm(storage, existing.study_id)
    log.info("resuming study %r in %s", name, where)
    return registry.get(name)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys (two levels deep) whose values differ."""
    found = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if not prefix and isinstance(a, Mapping) and isinstance(b, Mapping):
            found += _differences(a, b, f"{key}.")
        else:
            found.append(f"{prefix}{key}")
    return found


def check_config(config: Config, *, check_session: bool = True) -> int | None:
    """Every check ``create`` makes before it writes anything; returns the study's budget.

    ``check_session`` imports ``session:`` here, so a bad reference fails now and not in
    every worker.
    """
    if check_session:
        if not config.session:
            raise ConfigError(config.source, "session", "missing; workers need 'module:function'")
        try:
            import_session(config.session)
        except SessionError as e:
            raise ConfigError(config.source, "session", str(e)) from None
    return _budget(config)


def _budget(config: Config) -> int | None:
    name = config.study.name
    budget = config.budget
    if budget is not None and len(config.enqueue) > budget:
        raise ConfigError(
            config.source, "enqueue",
            f"{len(config.enqueue)} points but the budget (study.n_trials) is {budget}",
        )  # fmt: skip
    if budget is None and config.study.timeout is None:
        log.warning("study %r has no n_trials and no timeout: it runs until stopped", name)
    return budget


def stop_study(storage: optuna.storages.RDBStorage, name: str) -> bool:
    """Workers take no new trial of it; running trials finish. False if it was not open."""
    registry = Registry(storage.engine)
    registry.get(name)  # raises StudyNotFoundError
    stopped = registry.move(name, OPEN, STOPPED) or registry.move(name, PAUSED, STOPPED)
    if stopped:  # with nothing running, nobody else will see it end
        fire_if_ended(Backend(storage, patient=False), registry.get(name).study_id)
    return stopped


def delete_study(storage: optuna.storages.RDBStorage, name: str) -> None:
    """Remove the study and all its trials."""
    registry = Registry(storage.engine)
    registry.create_table()
    record = registry.find(name)
    found = record is not None
    if record is not None:
        registry.delete_metrics(record.study_id)
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        if not found:
            raise StudyNotFoundError(f"no study named {name!r} in {redact(storage.url)}") from None
    registry.delete(name)
