"""Helpers of the worker-pool tests: create studies, wait on the database, count trials."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from tests.conftest import make_config, run_cli, write_config


def create(tmp_path: Path, url: str, name: str = "pool", **overrides: Any) -> str:
    config = make_config(**overrides)
    config["study"]["name"] = name
    path = write_config(tmp_path / f"{abs(hash(name))}.yaml", config)  # names may hold "/"
    result = run_cli("hpo-coordinator", "create", str(path), url=url)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1]


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def counts(url: str, name: str) -> Counter[str]:
    return Counter(t.state.name for t in trials(url, name))


def wait_until(
    what: str, check: Callable[[], bool], timeout: float = 60, every: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
