"""The project's own tools keep working: lint and types clean, benchmarks runnable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from tests.conftest import BIN, ROOT, missing_service


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_ruff_is_clean() -> None:
    # Not experiments/: that is the user's code, and their lint is not this suite's business.
    result = run(str(BIN / "ruff"), "check", "hpo_framework", "workers", "tests", "bench")
    assert result.returncode == 0, result.stdout


def test_mypy_is_clean() -> None:
    result = run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout


@pytest.mark.usefixtures("pg_admin")
def test_benchmark_script_runs_at_a_tiny_size() -> None:
    result = run(sys.executable, "bench/run.py", "--quick", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in result.stdout.splitlines()
        if line.startswith("| ")
    }
    expected = {"cost", "driver", "overhead", "budget", "start-up", "growth", "inspect"}
    expected |= {"executor hop", "executor start", "connections"}
    assert expected | {"1", "2", "branin", "hartmann6"} <= set(rows)  # "1", "2": the curve
    assert rows["budget"][1] == "0"  # hpo's budget overshoot
    statements = next(line for line in result.stdout.splitlines() if "SQL statements" in line)
    assert float(statements.split("|")[3]) <= 8  # hpo's statements per trial
    assert rows["connections"][1].endswith("/ 0")  # no worker failed


def test_a_worker_starts_without_torch_boto3_or_plotting_libraries() -> None:
    """They cost a worker's start whole seconds (torch) or a fifth of one (boto3, which Optuna's
    artifact stores import): loaded only by a session, or a config, that uses them."""
    code = (
        "import sys, hpo_framework, workers.cli; "
        "print(sorted({'torch', 'boto3', 'matplotlib', 'plotly'} & set(sys.modules)))"
    )
    assert run(sys.executable, "-c", code).stdout.strip() == "[]"


def test_the_package_builds_under_its_own_free_name_with_an_spdx_license(tmp_path: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # "hpo" on the public index is an unrelated project: `pip install hpo` gives its code
    assert project["name"] == "hpo-framework" and project["license"] == "MIT"
    had_build = (ROOT / "build").exists()
    try:
        built = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
             str(tmp_path), str(ROOT)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        if not had_build:  # setuptools builds in the tree
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert built.returncode == 0, built.stderr
    assert "deprecat" not in (built.stdout + built.stderr).lower()
    (wheel,) = tmp_path.glob("hpo_framework-*.whl")
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
    assert "License-Expression: MIT" in meta


@pytest.mark.usefixtures("pg_admin")
def test_capacity_script_runs_at_a_tiny_size() -> None:
    result = run(sys.executable, "bench/capacity.py", "--quick", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    fleets = [row.split("|")[1].strip() for row in rows]
    assert {"100", "1,000", "10,000"} <= set(fleets)
    assert any("server CPU per trial" in row for row in rows)


@pytest.mark.usefixtures("pg_admin")
def test_fleet_script_runs_at_a_tiny_size() -> None:
    """bench/fleet.py: workers on a private server, directly and through PgBouncer."""
    from tests.pgbouncer import pgbouncer_binary
    from tests.private_postgres import server_bindir

    if server_bindir() is None or pgbouncer_binary() is None:
        missing_service("bench/fleet.py needs PostgreSQL's server binaries and pgbouncer")
    result = run(sys.executable, "bench/fleet.py", "--quick", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in result.stdout.splitlines()
        if line.startswith("| 4 ")
    ]
    assert [row[1] for row in rows] == ["hpo, direct", "hpo, PgBouncer", "plain Optuna, PgBouncer"]
    for row in rows[:2]:  # hpo: the exact budget, nothing failed
        assert row[4] == "8 / 8" and row[5] == "0" and row[6] == "0 / 0", row


def test_the_fast_tier_needs_no_database_server_and_no_docker() -> None:
    """``make test-fast`` (tests/unit) passes with PostgreSQL and Docker out of reach, under
    CI=true, where a test needing either would fail instead of skipping."""
    env = {
        **os.environ, "CI": "true", "DOCKER_HOST": "tcp://127.0.0.1:1",
        "HPO_TEST_PG_URL": "postgresql+psycopg2://nobody@127.0.0.1:1/none",
    }  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
