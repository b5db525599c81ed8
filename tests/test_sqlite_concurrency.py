"""Several processes writing one SQLite file at once lose no trial and break no budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
