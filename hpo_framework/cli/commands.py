"""``hpo-coordinator`` and ``hpo-inspect``: thin click adapters over the library."""

from __future__ import annotations

import csv
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import click
import optuna
import sqlalchemy.exc
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import make_url

from hpo_framework.cli.options import (
    config_storage_option,
    storage_option,
    translate_errors,
    version_option,
)
from hpo_framework.config.schema import load_config, read_yaml_file
from hpo_framework.exceptions import ConfigError, StorageError
from hpo_framework.operations.coordinator import (
    check_config,
    create_study,
    delete_study,
    stop_study,
)
from hpo_framework.operations.day2 import enqueue_points, move, retry_failed, set_limits
from hpo_framework.session.reporting import SUGGESTED_KEY
from hpo_framework.storage import metrics
from hpo_framework.storage.database import (
    cannot_open,
    check_url,
    open_storage,
    redact,
    resolve_storage_url,
    schema_exists,
)
from hpo_framework.views.inspection import (
    STATES,
    best_config,
    list_studies,
    metric_histories,
    summarize,
    trial_detail,
    worker_status,
)
from hpo_framework.views.watch import watch as watch_study

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _open(storage: str | None, config_storage: str | None = None, create: bool = False) -> Any:
    """The storage; for the reading commands, one line (and no new SQLite file) when it holds
    no hpo study yet."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = check_url(resolve_storage_url(storage, config_storage))
    if not create:
        _require_hpo_schema(url)
    return open_storage(url, create_schema=create, role="hpo-cli")


_CREATE_HINT = "create one with `hpo-coordinator create config.yaml`, or pass --storage"


def _require_sqlite_file(url: str) -> None:
    """A SQLite URL must name an existing file: opening it would create an empty one."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).exists():
            raise StorageError(f"no database at {redact(url)}: {_CREATE_HINT}")


def _require_hpo_schema(url: str) -> None:
    _require_sqlite_file(url)
    hint = _CREATE_HINT
    try:
        found = schema_exists(url)
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise cannot_open(url, e, _first_line(e)) from None
    if not found:
        raise StorageError(f"no hpo studies in {redact(url)} (no hpo tables): {hint}")


def _first_line(e: BaseException) -> str:
    inner = getattr(e, "orig", None) or e
    return " ".join(str(inner).split())[:300]


def _fmt(values: list[float] | None) -> str:
    return "-" if not values else ", ".join(f"{v:.6g}" for v in values)


def _console(stderr: bool = False) -> Console:
    # markup off: study names, parameters and error texts are the user's, printed as written
    # (a study named "exp[/v2]" must not be read as a closing style tag).
    return Console(soft_wrap=False, width=120, highlight=False, markup=False, stderr=stderr)


# --- hpo-coordinator ---------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
@version_option
def coordinator() -> None:
    """Create and run studies in the shared storage, and change them while they run."""


@coordinator.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--name", help="Study name (default: the config's study.name).")
@click.option("--resume", is_flag=True, help="Continue an existing study of the same config.")
@click.option("--wait", is_flag=True, help="Show live progress until the study finishes.")
@click.option(
    "--set", "assignments", multiple=True, metavar="KEY.PATH=VALUE",
    help="Override a config value, e.g. --set study.n_trials=8 (read as YAML; repeatable).",
)  # fmt: skip
@click.option(
    "--from", "copy_from", metavar="OLD",
    help="Copy study OLD's completed trials that fit this search space (warm start).",
)  # fmt: skip
@config_storage_option
@translate_errors
def create(
    config_path: str, name: str | None, resume: bool, wait: bool, assignments: tuple[str, ...],
    copy_from: str | None, storage: str | None,
) -> None:  # fmt: skip
    """Check CONFIG, create its study and enqueue its points; print the study name last."""
    config = load_config(config_path)
    if assignments:
        config = config.with_overrides(list(assignments))
    if name:
        config = config.with_name(name)
    check_config(config)  # before the storage: a refused config writes nothing, not even tables
    rdb = _open(storage, config.storage, create=True)
    record = create_study(
        rdb, config, resume=resume, check_session=False, copy_from=copy_from
    )  # the session was checked just now
    budget = "unlimited" if record.budget is None else record.budget
    copied = f"{record.claimed} trial(s) copied from {copy_from!r}, " if copy_from else ""
    click.echo(
        f"study {record.name!r} ready in {redact(rdb.url)}: budget {budget}, "
        f"{len(config.enqueue)} enqueued point(s), {copied}session {record.session_ref}"
    )
    summary = None
    if wait:
        summary = watch_study(rdb, record.name, _console(stderr=True))
        _print_summary(summary, stderr=True)
    else:  # the next step, as `wandb sweep` prints `wandb agent`
        click.echo(f"start workers: HPO_STORAGE={shlex.quote(redact(rdb.url))} hpo-worker")
    click.echo(record.name)
    if summary is not None:
        _exit_if_failed(summary)


#: The exit status of ``run`` and ``create --wait`` for a study that ended failed.
STUDY_FAILED_EXIT = 3


def _exit_if_failed(summary: dict[str, Any]) -> None:
    """Exit 3 when the study ended failed (``max_failed_trials``, a broken contract), so a
    script or CI can tell it from a study that finished."""
    if summary["state"] == "failed":
        reason = summary.get("study_error") or "see its failed trials (hpo-inspect)"
        click.echo(f"Error: study {summary['study']!r} failed: {reason}", err=True)
        sys.exit(STUDY_FAILED_EXIT)


@coordinator.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option(
    "--set", "assignments", multiple=True, metavar="KEY.PATH=VALUE",
    help="Override a config value, as for create (read as YAML; repeatable).",
)  # fmt: skip
@translate_errors
def check(config_path: str, assignments: tuple[str, ...]) -> None:
    """Check CONFIG as create would (the session imported on this host); write nothing."""
    config = load_config(config_path)
    if assignments:
        config = config.with_overrides(list(assignments))
    budget = check_config(config)
    click.echo(
        f"{config_path}: ok: study {config.study.name!r}, budget "
        f"{'unlimited' if budget is None else budget}, {len(config.search_space)} searched "
        f"parameter(s), sampler {config.study.sampler.name}, session {config.session}"
    )


@coordinator.command("list")
@storage_option
@translate_errors
def list_command(storage: str | None) -> None:
    """One line per study: state, budget progress, best value."""
    _print_study_list(list_studies(_open(storage)), _console())


@coordinator.command()
@click.argument("name")
@storage_option
@translate_errors
def stop(name: str, storage: str | None) -> None:
    """Stop NAME: workers take no new trial of it; running trials finish."""
    if stop_study(_open(storage), name):
        click.echo(f"study {name!r} stopped; running trials will finish")
    else:
        click.echo(f"study {name!r} was not open; nothing to stop")


# --- day-2: change a study that exists -----------------------------------------------------------


def _limit(value: str) -> Any:
    """A limit as typed: a YAML scalar, with ``none`` for no limit (checked as in a config)."""
    try:
        read = yaml.safe_load(value) if value.strip() else value
    except yaml.YAMLError:
        return value  # checked as text: "must be an integer ..., got '[1'"
    return None if isinstance(read, str) and read.lower() in ("none", "null") else read


@coordinator.command("set")
@click.argument("name")
@click.option("--n-trials", metavar="N|none", help="The budget; not below the trials taken.")
@click.option("--timeout", metavar="SECONDS|none", help="End the study this long from now.")
@click.option("--max-failed-trials", metavar="N|none", help="Fail the study after N failures.")
@click.option("--max-retries", metavar="N", help="Re-evaluations of a failed trial's point.")
@storage_option
@translate_errors
def set_command(name: str, storage: str | None, **options: str | None) -> None:
    """Change the limits of study NAME while it runs; workers follow at their next poll."""
    limits = {k: _limit(v) for k, v in options.items() if v is not None}
    if not limits:
        raise click.UsageError(
            "nothing to change: give --n-trials, --timeout, --max-failed-trials or --max-retries"
        )
    changes = set_limits(_open(storage), name, limits)
    for change in changes:
        click.echo(f"study {name!r}: {change}")
    if not changes:
        click.echo(f"study {name!r}: nothing to change")


@coordinator.command()
@click.argument("name")
@storage_option
@translate_errors
def pause(name: str, storage: str | None) -> None:
    """Pause NAME: workers take no new trial of it; running trials finish."""
    move(_open(storage), name, "pause")
    click.echo(
        f"study {name!r} paused; running trials will finish (resume: hpo-coordinator resume)"
    )


@coordinator.command()
@click.argument("name")
@storage_option
@translate_errors
def resume(name: str, storage: str | None) -> None:
    """Resume NAME after pause: workers take its trials again."""
    move(_open(storage), name, "resume")
    click.echo(f"study {name!r} resumed")


@coordinator.command()
@click.argument("name")
@click.option("--reason", help="Why, recorded with the study (hpo-inspect shows it).")
@storage_option
@translate_errors
def reopen(name: str, reason: str | None, storage: str | None) -> None:
    """Reopen a stopped or failed study NAME: its failures count from 0, its timeout from now."""
    was = move(_open(storage), name, "reopen", reason)
    why = f" ({was.error})" if was.error else ""
    click.echo(f"study {name!r} reopened; it was {was.state}{why}")


@coordinator.command("retry-failed")
@click.argument("name")
@storage_option
@translate_errors
def retry_failed_command(name: str, storage: str | None) -> None:
    """Re-queue the points of NAME's failed trials (those not re-queued yet), within its budget."""
    done, pending = retry_failed(_open(storage), name)
    left = pending - done
    more = (
        f"; {left} more have no room in the budget (raise it: hpo-coordinator set {name} "
        "--n-trials N)"
        if left
        else ""
    )
    click.echo(f"study {name!r}: re-queued {done} failed trial(s){more}")


@coordinator.command()
@click.argument("name")
@click.argument("points_path", metavar="POINTS", type=click.Path(dir_okay=False))
@storage_option
@translate_errors
def enqueue(name: str, points_path: str, storage: str | None) -> None:
    """Evaluate the point(s) in POINTS (YAML: a mapping like cfg, or a list) next in NAME."""
    points = read_yaml_file(points_path)
    n = enqueue_points(_open(storage), name, points, points_path)
    click.echo(f"study {name!r}: enqueued {n} point(s)")


@coordinator.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option(
    "--set", "assignments", multiple=True, metavar="KEY.PATH=VALUE",
    help="Override a config value, as for create (read as YAML; repeatable).",
)  # fmt: skip
@config_storage_option
@translate_errors
def run(config_path: str, assignments: tuple[str, ...], storage: str | None) -> None:
    """Run CONFIG's study in this process with its session:, as run_hpo does; then summarize."""
    config = load_config(config_path)
    if assignments:
        config = config.with_overrides(list(assignments))
    check_config(config)
    if not config.session:
        raise ConfigError(config.source, "session", "missing; run needs 'module:function'")
    from hpo_framework.runner import run_hpo

    study = run_hpo(config.session, config, storage)
    summary = summarize(_open(storage, config.storage), study.study_name)
    _print_summary(summary)
    _exit_if_failed(summary)


@coordinator.command()
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@storage_option
@translate_errors
def delete(name: str, yes: bool, storage: str | None) -> None:
    """Delete NAME and all its trials."""
    if not yes:
        click.confirm(f"Delete study {name!r} and all its trials?", abort=True)
    delete_study(_open(storage), name)
    click.echo(f"study {name!r} deleted")


@coordinator.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@storage_option
@translate_errors
def dashboard(host: str, port: int, storage: str | None) -> None:
    """Serve optuna-dashboard for every study in the storage, until SIGTERM or Ctrl-C."""
    from hpo_framework.views.dashboard import serve

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = check_url(resolve_storage_url(storage))
    _require_sqlite_file(url)  # an empty server database is served (compose starts it first)
    serve(url, host, port)


# --- hpo-inspect -------------------------------------------------------------------------------


@click.command(context_settings=CONTEXT)
@version_option
@click.argument("study", required=False)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
    show_default=True, help="Output format.",
)  # fmt: skip
@click.option(
    "--top", type=click.IntRange(min=0), default=10, show_default=True,
    help="How many best trials to list.",
)  # fmt: skip
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False), help="Write json/csv here, not stdout."
)
@click.option(
    "--plot", "plot_dir", type=click.Path(file_okay=False),
    help="Write PNG and HTML plots and an index.html to this directory.",
)  # fmt: skip
@click.option("--watch", is_flag=True, help="Live view until the study is done.")
@click.option(
    "--workers", "show_workers", is_flag=True,
    help="The workers instead: live and lost, what each runs, which studies it skips and why.",
)  # fmt: skip
@click.option(
    "--trial", "trial_number", type=click.IntRange(min=0), metavar="N",
    help="Trial N of STUDY in full: cfg, values, intermediate values, attributes, attempts.",
)  # fmt: skip
@click.option(
    "--best-config", "best_config_path", type=click.Path(dir_okay=False), metavar="FILE",
    help="Write the best trial's complete cfg (static and searched, nested) as YAML.",
)  # fmt: skip
@click.option(
    "--metrics", "show_metrics", is_flag=True,
    help="Every value sessions logged with trial().log, one row per trial, metric and step.",
)  # fmt: skip
@storage_option
@translate_errors
def inspect_command(
    study: str | None, fmt: str, top: int, output: str | None, plot_dir: str | None,
    watch: bool, show_workers: bool, trial_number: int | None, best_config_path: str | None,
    show_metrics: bool, storage: str | None,
) -> None:  # fmt: skip
    """Summarize every study, or one STUDY in detail, from the database."""
    rdb = _open(storage)
    if (trial_number is not None or best_config_path or show_metrics) and study is None:
        raise click.UsageError("--trial, --best-config and --metrics need a STUDY")
    if show_metrics:
        _emit_metrics(metrics.long_rows(metric_histories(rdb, study or "")), fmt, output)
        return
    if best_config_path:
        cfg, asked = best_config(rdb, study or "")
        content = {**cfg, SUGGESTED_KEY: asked} if asked else cfg
        try:
            Path(best_config_path).write_text(yaml.safe_dump(content, sort_keys=False))
        except OSError as e:
            raise click.ClickException(f"cannot write {best_config_path}: {e.strerror}") from None
        if asked:
            click.echo(
                f"note: the session asked for {', '.join(sorted(asked))} itself "
                f"(trial().suggest_*): kept under {SUGGESTED_KEY}:, which "
                "hpo_framework.load_best(FILE) hands back to trial().suggest_*", err=True,
            )  # fmt: skip
        click.echo(f"wrote {best_config_path}: the complete cfg of the best trial of {study!r}")
        return
    if trial_number is not None:
        detail = trial_detail(rdb, study or "", trial_number)
        if fmt == "json":
            _emit(json.dumps(detail, indent=2, default=str) + "\n", output)
        else:
            _emit(_trial_text(detail), output)
        return
    if show_workers:
        if study or plot_dir or watch:
            raise click.UsageError("--workers takes no STUDY, --plot or --watch")
        _emit_workers(worker_status(rdb), fmt, output)
        return
    if study is None:
        if plot_dir or watch:
            raise click.UsageError("--plot and --watch need a STUDY")
        _emit(_study_list_text(list_studies(rdb), fmt), output)
        return
    if watch:
        _print_summary(watch_study(rdb, study, _console(), top=top))
        return
    summary = summarize(rdb, study, top=top, all_trials=fmt != "table" or bool(plot_dir))
    if plot_dir:
        from hpo_framework.views.plots import write_plots  # plotting libraries only when asked for

        loaded = optuna.load_study(study_name=study, storage=rdb)
        files = write_plots(
            loaded,
            Path(plot_dir),
            summary,
            progress=lambda t: click.echo(f"plotting {t}", err=True),
            histories=metric_histories(rdb, study),
        )
        click.echo(f"wrote {len(files)} files; open {Path(plot_dir) / 'index.html'}")
        return
    if fmt == "json":
        _emit(json.dumps(summary, indent=2, default=str) + "\n", output)
    elif fmt == "csv":
        _emit(_trials_csv(summary["trials"], summary["directions"]), output)
    elif output:
        console = _console()
        with console.capture() as captured:
            _print_summary(summary, console=console)
        _emit(captured.get(), output)
    else:
        _print_summary(summary)


def _emit(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


def _study_list_text(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["study", "state", "finished", "budget", "best", "running", "failed"])
        for r in rows:
            best = "" if r["best"] is None else ";".join(map(str, r["best"]))
            writer.writerow(
                [
                    r["study"],
                    r["state"],
                    r["finished"],
                    r["budget"],
                    best,
                    r["running"],
                    r["failed"],
                ]
            )
        return out.getvalue()
    console = _console()
    with console.capture() as captured:
        _print_study_list(rows, console)
    return captured.get()


def _print_study_list(rows: list[dict[str, Any]], console: Console) -> None:
    if not rows:
        console.print("no studies yet: create one with `hpo-coordinator create config.yaml`")
        return
    table = Table("study", "state", "progress", "best", "running", "failed")
    for r in rows:
        budget = "∞" if r["budget"] is None else r["budget"]
        table.add_row(
            r["study"], r["state"], f"{r['finished']}/{budget}", _fmt(r["best"]),
            str(r["running"]), str(r["failed"]),
        )  # fmt: skip
    console.print(table)


def _trial_text(d: dict[str, Any]) -> str:
    """One trial as lines a person reads; the JSON format has the same fields."""
    values = _fmt(d["values"])
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


def _emit_metrics(rows: list[dict[str, Any]], fmt: str, output: str | None) -> None:
    """``--metrics``: the long form as JSON, CSV or a table."""
    keys = ["trial", "metric", "step", "value", "at"]
    if fmt == "json":
        _emit(json.dumps(rows, indent=2) + "\n", output)
        return
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, keys)
        writer.writeheader()
        writer.writerows(rows)
        _emit(buffer.getvalue(), output)
        return
    table = Table(*keys[:4], title=f"{len(rows)} logged value(s)", title_justify="left")
    for r in rows:
        step = "-" if r["step"] is None else str(r["step"])
        table.add_row(str(r["trial"]), r["metric"], step, f"{r['value']:.6g}")
    console = _console()
    with console.capture() as captured:
        console.print(table)
    _emit(captured.get(), output)


def _emit_workers(rows: list[dict[str, Any]], fmt: str, output: str | None) -> None:
    if fmt == "json":
        _emit(json.dumps(rows, indent=2) + "\n", output)
        return
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        keys = ["worker", "state", "seen_s_ago", "version", "gpus", "serves", "running"]
        writer.writerow(keys)
        for r in rows:
            writer.writerow([";".join(r[k]) if k == "running" else r[k] for k in keys])
        _emit(buffer.getvalue(), output)
        return
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
    console = _console()
    with console.capture() as captured:
        console.print(table)
    _emit(captured.get(), output)


def _print_summary(
    s: dict[str, Any], stderr: bool = False, console: Console | None = None
) -> None:
    console = console or _console(stderr)
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
        best.add_row(str(b["number"]), _fmt(b["values"]), json.dumps(b["params_nested"]))
    console.print(best)

    top = Table(
        "trial",
        "value",
        "worker",
        "duration",
        "params",
        title=f"top {len(s['top'])}",
        title_justify="left",
    )
    for t in s["top"]:
        top.add_row(
            str(t["number"]),
            _fmt(t["values"]),
            str(t["worker"]),
            f"{t['duration_s']:.2f}s",
            json.dumps(t["params"]),
        )
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


def _trials_csv(trials: list[dict[str, Any]], directions: list[str]) -> str:
    params = sorted({p for t in trials for p in t["params"]})
    value_cols = (
        ["value"] if len(directions) == 1 else [f"value_{i}" for i in range(len(directions))]
    )
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["number", "state", *value_cols, *params, "worker", "duration_s", "error"])
    for t in trials:
        values = t["values"] or [None] * len(value_cols)
        writer.writerow(
            [t["number"], t["state"], *values, *(t["params"].get(p) for p in params),
             t["worker"], t["duration_s"], t["error"]]
        )  # fmt: skip
    return out.getvalue()
