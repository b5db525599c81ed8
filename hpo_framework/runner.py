"""``run_hpo``: the seed's entry point, one process running a whole study."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import optuna

from hpo_framework.config.schema import Config, load_config
from hpo_framework.exceptions import ConfigError
from hpo_framework.logs import ensure_console_logging
from hpo_framework.operations.coordinator import create_study
from hpo_framework.runtime.executor import (
    InProcessExecutor,
    ProcessExecutor,
    SessionFn,
    importable_ref,
)
from hpo_framework.runtime.heartbeat import Heartbeat
from hpo_framework.runtime.progress import progress_bar
from hpo_framework.runtime.trials import open_study
from hpo_framework.storage.backend import Backend
from hpo_framework.storage.database import open_storage, resolve_storage_url
from hpo_framework.storage.presence import worker_id
from hpo_framework.storage.registry import FAILED

log = logging.getLogger("hpo.runner")


def run_hpo(
    session_fn: SessionFn | str, config_path: str | Path | Config, storage: str | None = None
) -> optuna.Study:
    """Optimize ``session_fn`` over the search space of ``config_path``; returns the study.

    ``session_fn`` is the function, or its reference ``"module:function"``; ``config_path``
    a config file or a loaded :class:`Config`.

    The study is created in the storage (``storage`` > ``HPO_STORAGE`` > config > SQLite), or
    resumed if one of the same name and config exists there, so other processes
    (``hpo-worker``) can join in and an interrupted run carries on where it stopped.
    Raises ConfigError before any trial runs if the config is invalid. A study that ended
    ``failed`` (``max_failed_trials`` reached) is returned too, with an ERROR log line saying so:
    check ``study.trials`` before ``study.best_trial``.

    Each trial runs in an executor process, as in a worker (so a crashing session fails only
    its trial), when ``session_fn`` can be imported by name there; a closure, a lambda or a
    function defined in ``__main__`` runs in this process instead.
    """
    ensure_console_logging()
    # a reference ("module:function", as config.yaml's session:) is imported by the executor only
    ref = session_fn if isinstance(session_fn, str) else importable_ref(session_fn)
    executor: InProcessExecutor | ProcessExecutor
    if ref is None:
        assert not isinstance(session_fn, str)
        executor = InProcessExecutor(session_fn)
    else:  # the caller chose this function: it may come from any module
        executor = ProcessExecutor(allowed=[ref.partition(":")[0]])
        executor.start()  # imports while this process opens the storage
    try:
        return _run(executor, ref, config_path, storage)
    finally:
        executor.close()


def _run(
    executor: InProcessExecutor | ProcessExecutor,
    ref: str | None,
    config_path: str | Path | Config,
    storage: str | None,
) -> optuna.Study:
    config = config_path if isinstance(config_path, Config) else load_config(config_path)
    url = resolve_storage_url(storage, config.storage)
    rdb = open_storage(url, create_schema=True, role="run_hpo")
    record = create_study(rdb, config, resume=True, check_session=False)
    if ref is not None:
        record = replace(record, session_ref=ref)
    backend = Backend(rdb)
    handle = open_study(backend, record, config, executor, worker_id=worker_id())
    with (
        Heartbeat(rdb) as heartbeat,
        progress_bar(
            record.name, record.budget, _finished(handle.study), config.study.directions,
            _best(handle.study),
        ) as on_outcome,
    ):  # fmt: skip
        _, broken = handle.run_trials(heartbeat, stopping=lambda: False, on_outcome=on_outcome)
    if broken is not None:
        key = "study.directions" if len(config.study.directions) > 1 else "study.direction"
        raise ConfigError(config.source, key, str(broken.error))
    final = backend.registry.get(record.name)
    if final.state == FAILED:  # returned all the same: the trials are the caller's to look at
        log.error("study %r failed: %s", final.name, final.error or "see its failed trials")
    return handle.study


def _finished(study: optuna.Study) -> int:
    """Trials of the study finished before this run (a resumed study starts its bar there)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def _best(study: optuna.Study) -> float | None:
    if len(study.directions) > 1:
        return None
    try:
        return float(study.best_value)
    except ValueError:  # no completed trial yet
        return None
