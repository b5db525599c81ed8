"""One renderer for the CLI's three formats. A command that shows data builds a ``View`` of
it once (the data ``--format json`` prints, the rows of ``--format csv``, and how a person
reads it: a rich table or plain lines), and :func:`show` picks the format and the place
(stdout, or ``--output FILE``)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hpo_framework.views.inspection import STATES

FORMATS = ("table", "json", "csv")


@dataclass(frozen=True)
class View:
    """Data in every format a command offers."""

    data: Any  #: what ``--format json`` prints
    table: Callable[[Console], None] | None = None  #: how a person reads it (``table``)
    rows: Callable[[], tuple[Sequence[str], Iterable[Sequence[Any]]]] | None = None
    #: ``--format csv``: a header and rows (None: what ``table`` shows instead)
    text: Callable[[], str] | None = None  #: plain lines instead of a rich table


def show(view: View, fmt: str, output: str | None) -> None:
    """Print ``view`` in ``fmt`` on stdout, or write it to ``output``."""
    if fmt == "json":
        emit(json.dumps(view.data, indent=2, default=str) + "\n", output)
    elif fmt == "csv" and view.rows is not None:
        header, rows = view.rows()
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        writer.writerows(rows)
        emit(buffer.getvalue(), output)
    elif view.text is not None:
        emit(view.text(), output)
    elif output is None:
        assert view.table is not None
        view.table(make_console())
    else:
        assert view.table is not None
        out = make_console()
        with out.capture() as captured:
            view.table(out)
        emit(captured.get(), output)


def emit(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


def make_console(stderr: bool = False) -> Console:
    # markup off: study names, parameters and error texts are the user's, printed as written
    # (a study named "exp[/v2]" must not be read as a closing style tag).
    return Console(soft_wrap=False, width=120, highlight=False, markup=False, stderr=stderr)


def values_text(values: list[float] | None) -> str:
    return "-" if not values else ", ".join(f"{v:.6g}" for v in values)


# --- the views ---------------------------------------------------------------------------------


def study_list_view(rows: list[dict[str, Any]]) -> View:
    def csv_rows() -> tuple[Sequence[str], Iterable[Sequence[Any]]]:
        header = ["study", "state", "finished", "budget", "best", "running", "failed"]
        return header, (
            [
                r["study"],
                r["state"],
                r["finished"],
                r["budget"],
                "" if r["best"] is None else ";".join(map(str, r["best"])),
                r["running"],
                r["failed"],
            ]  # fmt: skip
            for r in rows
        )

    return View(rows, lambda c: print_study_list(rows, c), csv_rows)


def print_study_list(rows: list[dict[str, Any]], console: Console) -> None:
    if not rows:
        console.print("no studies yet: create one with `hpo-coordinator create config.yaml`")
        return
    table = Table("study", "state", "progress", "best", "running", "failed")
    for r in rows:
        budget = "∞" if r["budget"] is None else r["budget"]
        table.add_row(
            r["study"], r["state"], f"{r['finished']}/{budget}", values_text(r["best"]),
            str(r["running"]), str(r["failed"]),
        )  # fmt: skip
    console.print(table)


def trial_view(detail: dict[str, Any]) -> View:
    """``--trial N``: plain lines (also for csv), or JSON with the same fields."""
    return View(detail, text=lambda: _trial_text(detail))


def _trial_text(d: dict[str, Any]) -> str:
    """One trial as lines a person reads; the JSON format has the same fields."""
    values = values_text(d["values"])
    duration = "-" if d["duration_s"] is None else f"{d['duration_s']:.2f}s"
    lines = [
        f"trial {d['number']}  state {d['state']}  value {values}  worker {d['worker']}  "
        f"duration {duration}",
        f"attempt {d['attempt']}"
        + (f" (of trial {d['retry_of']})" if d["retry_of"] is not None else "")
        + (f"  copied from {d['copied_from']}" if d["copied_from"] else ""),
        "cfg:",
        *("  " + line for line in yaml.safe_dump(d["cfg"], sort_keys=False).splitlines()),
    ]
    if d["asked"]:
        lines.append(f"asked for by the session (not in cfg): {json.dumps(d['asked'])}")
    if d["intermediate_values"]:
        steps = " ".join(f"{k}:{v:.6g}" for k, v in d["intermediate_values"].items())
        lines.append(f"intermediate values: {steps}")
    if d["metrics"]:
        lines.append("logged metrics (step:value; all of them: --metrics):")
        for name, points in d["metrics"].items():
            shown = " ".join(f"{p['step'] if p['step'] is not None else '-'}:{p['value']:.6g}"
                             for p in points[-12:])  # fmt: skip
            more = f"... ({len(points)} values) " if len(points) > 12 else ""
            lines.append(f"  {name}: {more}{shown}")
    for key, value in d["attributes"].items():
        lines.append(f"{key}: {json.dumps(value)}")
    if len(d["attempts"]) > 1:
        tried = ", ".join(f"#{a['number']} {a['state']}" for a in d["attempts"])
        lines.append(f"attempts of this point: {tried}")
    if d["error"]:
        lines.append(f"error: {d['error']}")
    if d["traceback"]:
        lines += ["traceback:", *("  " + line for line in d["traceback"].splitlines())]
    return "\n".join(lines) + "\n"


def metrics_view(rows: list[dict[str, Any]]) -> View:
    """``--metrics``: the long form, one row per trial, metric and step."""
    keys = ["trial", "metric", "step", "value", "at"]

    def table(console: Console) -> None:
        table = Table(*keys[:4], title=f"{len(rows)} logged value(s)", title_justify="left")
        for r in rows:
            step = "-" if r["step"] is None else str(r["step"])
            table.add_row(str(r["trial"]), r["metric"], step, f"{r['value']:.6g}")
        console.print(table)

    return View(rows, table, lambda: (keys, ([r.get(k, "") for k in keys] for r in rows)))


def workers_view(rows: list[dict[str, Any]]) -> View:
    """``--workers``: live and lost workers, what each runs and which studies it skips."""
    keys = ["worker", "state", "seen_s_ago", "version", "gpus", "serves", "running"]

    def table(console: Console) -> None:
        table = Table(
            "worker", "state", "last seen", "version", "gpus", "serves", "running", "skips",
            title=f"{sum(r['state'] == 'live' for r in rows)} live, "
            f"{sum(r['state'] == 'lost' for r in rows)} lost worker(s)", title_justify="left",
        )  # fmt: skip
        for r in rows:
            skips = "; ".join(f"{study}: {why}" for study, why in r["cannot_serve"].items())
            table.add_row(
                r["worker"], r["state"], f"{r['seen_s_ago']:.0f}s ago", r["version"],
                r["gpus"] or "-", r["serves"], ", ".join(r["running"]) or "-", skips or "-",
            )  # fmt: skip
        console.print(table)

    return View(
        rows,
        table,
        lambda: (keys, ([";".join(r[k]) if k == "running" else r[k] for k in keys] for r in rows)),
    )


def summary_view(summary: dict[str, Any]) -> View:
    """One study: the summary table, its JSON, or its trials as CSV."""
    return View(summary, lambda c: print_summary(summary, console=c), lambda: _trial_rows(summary))


def print_summary(s: dict[str, Any], stderr: bool = False, console: Console | None = None) -> None:
    console = console or make_console(stderr)
    budget = "∞" if s["budget"] is None else s["budget"]
    console.print(
        Text.assemble(
            (s["study"], "bold"),
            f"  state {s['state']}  directions {', '.join(s['directions'])}"
            f"  progress {s['finished']}/{budget}",
        )
    )
    console.print("  ".join(f"{k} {s['counts'][k]}" for k in STATES))
    d = s["duration_s"]
    if d["mean"] is not None:
        console.print(f"duration mean {d['mean']:.2f}s  p50 {d['p50']:.2f}s  p95 {d['p95']:.2f}s")
    if s["study_error"] and s["state"] == "stopped":  # a stop rule met (study.stop_when)
        console.print(Text(f"stopped: {s['study_error']}"))
    elif s["study_error"]:
        console.print(Text(f"study error: {s['study_error']}", style="red"))

    title = "Pareto front" if len(s["directions"]) > 1 else "best trial"
    best = Table("trial", "value", "params", title=title, title_justify="left")
    for b in s["best"]:
        best.add_row(str(b["number"]), values_text(b["values"]), json.dumps(b["params_nested"]))
    console.print(best)

    top = Table(
        "trial", "value", "worker", "duration", "params", title=f"top {len(s['top'])}",
        title_justify="left",
    )  # fmt: skip
    for t in s["top"]:
        top.add_row(
            str(t["number"]), values_text(t["values"]), str(t["worker"]),
            f"{t['duration_s']:.2f}s", json.dumps(t["params"]),
        )  # fmt: skip
    console.print(top)

    workers = Table("worker", "trials", title="trials per worker", title_justify="left")
    for worker, n in s["workers"].items():
        workers.add_row(worker, str(n))
    console.print(workers)
    if s["cannot_serve"]:
        skipped = Table(
            "worker", "why it skips this study", title="workers that cannot serve it here",
            title_justify="left",
        )  # fmt: skip
        for worker, why in s["cannot_serve"].items():
            skipped.add_row(worker, why)
        console.print(skipped)
    for r in s["reopened"]:
        error = f": {r['error']}" if r.get("error") else ""
        console.print(
            Text(f"reopened {r['at']} (was {r['was']}{error}): {r.get('reason') or '-'}")
        )
    if s["errors"]:
        errors = Table("trial", "error", title="last errors", title_justify="left")
        for e in s["errors"]:
            errors.add_row(str(e["number"]), str(e["error"]))
        console.print(errors)


def _trial_rows(s: dict[str, Any]) -> tuple[Sequence[str], Iterable[Sequence[Any]]]:
    trials, directions = s["trials"], s["directions"]
    params = sorted({p for t in trials for p in t["params"]})
    value_cols = (
        ["value"] if len(directions) == 1 else [f"value_{i}" for i in range(len(directions))]
    )
    header = ["number", "state", *value_cols, *params, "worker", "duration_s", "error"]
    return header, (
        [t["number"], t["state"], *(t["values"] or [None] * len(value_cols)),
         *(t["params"].get(p) for p in params), t["worker"], t["duration_s"], t["error"]]
        for t in trials
    )  # fmt: skip
