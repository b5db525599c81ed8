"""The README's first hour, run as written on a fresh checkout.

The code blocks marked ``<!-- runnable ... -->`` in README.md run in order in one shell, after
``make demo`` (the first of the README's two commands), in a copy of the tracked files that
shares this checkout's ``.venv`` (so no second install), with the PATH and environment of a
new user: no ``.venv/bin`` on PATH and no ``HPO_STORAGE``. README.ko.md must mark the same
commands.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

_FENCE = re.compile(r"^```(\w*)$")


def runnable_blocks(readme: Path) -> list[str]:
    """The bash blocks right after a ``<!-- runnable`` comment, in order."""
    lines = readme.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if not line.startswith("<!-- runnable"):
            continue
        assert lines[i + 1] == "```bash", f"{readme.name}:{i + 2}: a runnable block is bash"
        end = next(j for j in range(i + 2, len(lines)) if _FENCE.match(lines[j]))
        blocks.append("\n".join(lines[i + 2 : end]))
    return blocks


def _commands(block: str) -> list[str]:
    """The block without its comments (they are in the README's language)."""
    code = (line.split("#")[0].strip() for line in block.splitlines())
    return [line for line in code if line]


def _fresh_checkout(into: Path) -> Path:
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, tracked.split("\0")):
        source = ROOT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)  # mtimes kept: make sees .venv up to date
    (into / ".venv").symlink_to(ROOT / ".venv")
    return into


def test_the_korean_readme_marks_the_same_commands() -> None:
    english = [_commands(b) for b in runnable_blocks(ROOT / "README.md")]
    assert len(english) >= 2
    assert [_commands(b) for b in runnable_blocks(ROOT / "README.ko.md")] == english


def test_the_readme_first_hour_runs_as_written(tmp_path: Path) -> None:
    two_commands = (ROOT / "README.md").read_text().split("## The two commands", 1)[1]
    assert "\nmake demo " in two_commands.split("```")[1]
    checkout = _fresh_checkout(tmp_path / "hpo")
    script = "\n".join(["set -euo pipefail", "make demo", *runnable_blocks(ROOT / "README.md")])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPO_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(
        p for p in env["PATH"].split(os.pathsep) if Path(p) != ROOT / ".venv" / "bin"
    )
    result = subprocess.run(
        ["bash", "-c", script], cwd=checkout, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # what the blocks promise, on disk
    assert "progress 30/30" in result.stdout
    assert (checkout / "plots" / "index.html").is_file()
    rows = (checkout / "trials.csv").read_text().splitlines()
    # no unexplained failures: an SGD run that diverges is pruned, saying so
    assert rows[0].startswith("number,state") and len(rows) == 1 + 30
    assert not [row for row in rows[1:] if row.split(",")[1] == "FAIL"]
    metrics = (checkout / "metrics.csv").read_text().splitlines()
    assert metrics[0] == "trial,metric,step,value,at" and len(metrics) > 100
    assert "validation MSE " in result.stdout  # the best cfg, trained once more
    # the operating block: each command's effect shows
    assert "n_trials 30 -> 34" in result.stdout
    assert "1 live, 0 lost worker(s)" in result.stdout
    assert "progress 34/34" in result.stdout
