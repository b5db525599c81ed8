"""A progress bar where the work runs: ``hpo-coordinator run`` and ``run_hpo`` on a terminal.

``k/N`` trials finished (of the study, not only this process's), the best value so far, the
time since this run started and the ETA from its throughput, drawn by rich on stderr; the
per-trial log lines scroll above it. Without a terminal (a pipe, a log file, CI) nothing
changes: one plain line per trial.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from hpo_framework.runtime.trials import TrialOutcome

OnOutcome = Callable[[TrialOutcome], None]


@contextlib.contextmanager
def progress_bar(
    name: str,
    budget: int | None,
    finished: int,
    directions: tuple[str, ...],
    best: float | None,
) -> Iterator[OnOutcome | None]:
    """Yield the function to call with each trial's outcome, or None where stderr is no
    terminal (then nothing is drawn)."""
    if not sys.stderr.isatty():
        yield None
        return
    console = Console(stderr=True)
    progress = Progress(
        TextColumn(name.replace("[", r"\["), style="bold"), BarColumn(),
        MofNCompleteColumn(), TextColumn("{task.fields[best]}"), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
    )  # fmt: skip
    single = len(directions) == 1
    sign = -1.0 if directions[0] == "maximize" else 1.0
    state = {"best": best}

    def best_text() -> str:
        if not single:
            return ""
        return "best -" if state["best"] is None else f"best {state['best']:.6g}"

    handlers = [h for h in logging.getLogger("hpo").handlers if type(h) is logging.StreamHandler]
    with progress:
        # the log lines go through rich's proxy of stderr, above the bar
        previous = [h.setStream(sys.stderr) for h in handlers]
        task = progress.add_task(name, total=budget, completed=finished, best=best_text())

        def on_outcome(outcome: TrialOutcome) -> None:
            if outcome.state.name not in ("COMPLETE", "PRUNED"):
                return  # a failed trial's point is retried: it does not count
            if single and outcome.values and outcome.state.name == "COMPLETE":
                value = outcome.values[0]
                if state["best"] is None or sign * value < sign * state["best"]:
                    state["best"] = value
            progress.update(task, advance=1, best=best_text())

        try:
            yield on_outcome
        finally:
            for h, stream in zip(handlers, previous, strict=True):
                if stream is not None:
                    h.setStream(stream)
