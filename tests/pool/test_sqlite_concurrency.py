"""Several processes writing one SQLite file at once lose no trial and break no budget."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpo_framework.storage.database import open_storage
from tests.conftest import ROOT, cli_env, make_config, start_worker, write_config
from tests.pool_helpers import counts, create


def test_four_worker_processes_on_one_sqlite_file(sqlite_url: str, tmp_path: Path) -> None:
    name = create(tmp_path, sqlite_url, static={"sleep_s": 0.02}, study_={"n_trials": 40})
    log = tmp_path / "w.log"
    pool = start_worker("--processes", "4", "--idle-exit", "2", url=sqlite_url, log=log)
    assert pool.wait(timeout=180) == 0, log.read_text()[-2000:]
    assert counts(sqlite_url, name) == {"COMPLETE": 40}
    assert "database is locked" not in log.read_text()


def test_three_run_hpo_processes_share_one_study(sqlite_url: str, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", make_config(study_={"n_trials": 30}))
    code = (
        "import sys; from hpo_framework import run_hpo; from tests.sessions import quadratic;"
        f"run_hpo(quadratic, {str(path)!r}, {sqlite_url!r})"
    )
    # The first creates the study; the others resume it (same name, same config).
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=cli_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert counts(sqlite_url, "test-study") == {"COMPLETE": 30}


# Each process imports, says it is ready, then waits for the others: all then check "table
# missing" and create at the same moment, and the losers must find the winner's tables.
_CREATE_AT_ONCE = """
import os, sys, time
from pathlib import Path
import sqlalchemy as sa
from hpo_framework.storage.registry import Registry
engine = sa.create_engine(sys.argv[1])
folder = Path(sys.argv[2])
(folder / f"ready-{os.getpid()}").touch()
while not (folder / "go").exists():
    time.sleep(0.002)
Registry(engine).create_table()
"""


@pytest.mark.parametrize("round_", [1, 2])
def test_processes_creating_hpo_tables_at_once_all_succeed(
    storage_url: str, tmp_path: Path, round_: int
) -> None:
    open_storage(storage_url, create_schema=True).engine.dispose()  # Optuna's tables only
    folder = tmp_path / "barrier"
    folder.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CREATE_AT_ONCE, storage_url, str(folder)],
            cwd=ROOT,
            env=cli_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    try:
        deadline = time.monotonic() + 120
        while len(list(folder.glob("ready-*"))) < len(procs):
            assert time.monotonic() < deadline, "the processes never got ready"
            ended = [p.communicate()[1] for p in procs if p.poll() is not None]
            assert not ended, ended
            time.sleep(0.05)
        (folder / "go").touch()
        errors = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0] * len(procs), [e[-800:] for e in errors]
