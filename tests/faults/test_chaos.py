"""The chaos soak at CI size: every kind of fault at least once, nothing lost."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
@pytest.mark.usefixtures("private_pg")  # proves a private server can start here (else fail/skip)
def test_chaos_soak_small() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.chaos.soak", "--workers", "4", "--trials", "120",
         "--faults", "8", "--fault-every", "1", "--deadline", "400"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    last = (
        result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert last.startswith("chaos soak PASSED")
    for fault in ("kill9", "sigstop", "sigterm", "pg_restart", "drop_connections",
                  "lost_answers", "outage", "sigstop_short"):  # fmt: skip
        assert f"{fault}=1" in last
    assert "; lost 0, duplicates 0;" in last
