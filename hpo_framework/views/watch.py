"""A live terminal view of one study: budget progress with ETA, running trials, best, failures.

Used by ``hpo-inspect STUDY --watch`` and ``hpo-coordinator create CONFIG --wait``; it reads
the database every few seconds and returns when the study is no longer open.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import optuna
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from hpo_framework.storage.database import retried
from hpo_framework.views.inspection import summarize

DONE_STATES = ("done", "timeout", "stopped", "failed")


def _running_table(summary: dict[str, Any]) -> Table:
    table = Table(
        "trial", "worker", "elapsed", "step", "last value", "params",
        title="running", title_justify="left",
    )  # fmt: skip
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for t in summary["running"]:
        started = t.get("started")
        elapsed = f"{(now - started).total_seconds():.0f}s" if started else "-"
        step = "-" if t.get("last_step") is None else str(t["last_step"])
        last = "-" if t.get("last_value") is None else f"{t['last_value']:.6g}"
        table.add_row(
            str(t["number"]), str(t["worker"]), elapsed, step, last, str(t["params"])[:60]
        )
    return table


def timing(summary: dict[str, Any]) -> str:
    """Elapsed since the study's first trial started (Optuna's clock, naive UTC), and the
    ETA of its budget at the throughput so far: the study's, not this watch's."""
    started = summary.get("started")
    if started is None:
        return "elapsed -:--:--  ETA -:--:--"
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    elapsed = max(0.0, (now - started).total_seconds())
    eta = "-:--:--"
    budget, finished = summary["budget"], summary["finished"]
    if budget is not None and finished > 0 and elapsed > 0:
        eta = _clock(max(0, budget - finished) * elapsed / finished)
    return f"elapsed {_clock(elapsed)}  ETA {eta}"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _view(progress: Progress, summary: dict[str, Any]) -> Group:
    best = summary["best"]
    best_text = (
        f"best: trial {best[0]['number']} value "
        + ", ".join(f"{v:.6g}" for v in best[0]["values"])
        if len(best) == 1
        else f"Pareto front: {len(best)} trials"
        if best
        else "best: no trial completed yet"
    )
    counts = summary["counts"]
    lines: list[Any] = [
        progress, timing(summary), best_text,
        f"failed {counts['FAIL']}  pruned {counts['PRUNED']}",
    ]  # fmt: skip
    if counts["RUNNING"]:
        lines.append(_running_table(summary))
    if summary["errors"]:
        last = summary["errors"][-1]
        lines.append(f"last error (trial {last['number']}): {last['error']}")
    return Group(*lines)


def watch(
    storage: optuna.storages.RDBStorage,
    name: str,
    console: Console,
    refresh: float = 2.0,
    timeout: float | None = None,
    top: int = 10,
) -> dict[str, Any]:
    """Show the study live until it is done and no trial of it runs any more (a stopped study
    lets its running trials finish), or ``timeout`` seconds pass; return its summary with the
    ``top`` best trials."""
    progress = Progress(
        TextColumn(name.replace("{", "{{").replace("}", "}}"), style="bold", markup=False),
        BarColumn(), TextColumn("{task.completed}/{task.total}"), console=console,
    )  # fmt: skip

    reader = _Reader(storage, name)
    summary = reader.summary(top=0, all_trials=False)
    task = progress.add_task(name, total=summary["budget"], completed=summary["finished"])
    deadline = None if timeout is None else time.monotonic() + timeout
    with Live(_view(progress, summary), console=console, refresh_per_second=4) as live:
        while summary["state"] not in DONE_STATES or summary["counts"]["RUNNING"]:
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(refresh)
            summary = reader.summary(top=0, all_trials=False)
            progress.update(task, completed=summary["finished"], total=summary["budget"])
            live.update(_view(progress, summary))
    return reader.summary(top=top)


class _Reader:
    """The watched study's summary; a read that fails waits the outage out (a watch outlives
    a database restart)."""

    patient = True

    def __init__(self, storage: optuna.storages.RDBStorage, name: str) -> None:
        self.storage, self.name = storage, name

    @retried("reading the study")
    def summary(self, *, top: int, all_trials: bool = True) -> dict[str, Any]:
        return summarize(self.storage, self.name, top=top, all_trials=all_trials)
