"""``hpo-coordinator`` and ``hpo-inspect``: thin click adapters over the library."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click
import optuna
import sqlalchemy.exc
import yaml
from sqlalchemy.engine import make_url

from hpo_framework.cli.options import (
    config_storage_option,
    set_option,
    storage_option,
    translate_errors,
    version_option,
)
from hpo_framework.cli.render import (
    FORMATS,
    make_console,
    metrics_view,
    print_study_list,
    print_summary,
    show,
    study_list_view,
    summary_view,
    trial_view,
    workers_view,
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
@set_option
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
        summary = watch_study(rdb, record.name, make_console(stderr=True))
        print_summary(summary, stderr=True)
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
@set_option
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
    print_study_list(list_studies(_open(storage)), make_console())


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
@set_option
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
    print_summary(summary)
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
    "--format", "fmt", type=click.Choice(FORMATS), default="table",
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
        show(metrics_view(metrics.long_rows(metric_histories(rdb, study or ""))), fmt, output)
    elif best_config_path:
        _write_best_config(rdb, study or "", best_config_path)
    elif trial_number is not None:
        show(trial_view(trial_detail(rdb, study or "", trial_number)), fmt, output)
    elif show_workers:
        if study or plot_dir or watch:
            raise click.UsageError("--workers takes no STUDY, --plot or --watch")
        show(workers_view(worker_status(rdb)), fmt, output)
    elif study is None:
        if plot_dir or watch:
            raise click.UsageError("--plot and --watch need a STUDY")
        show(study_list_view(list_studies(rdb)), fmt, output)
    elif watch:
        print_summary(watch_study(rdb, study, make_console(), top=top))
    elif plot_dir:
        _write_plots(rdb, study, plot_dir, top)
    else:
        show(summary_view(summarize(rdb, study, top=top, all_trials=fmt != "table")), fmt, output)


def _write_best_config(rdb: Any, study: str, path: str) -> None:
    """``--best-config FILE``: the best trial's complete cfg as YAML."""
    cfg, asked = best_config(rdb, study)
    content = {**cfg, SUGGESTED_KEY: asked} if asked else cfg
    try:
        Path(path).write_text(yaml.safe_dump(content, sort_keys=False))
    except OSError as e:
        raise click.ClickException(f"cannot write {path}: {e.strerror}") from None
    if asked:
        click.echo(
            f"note: the session asked for {', '.join(sorted(asked))} itself "
            f"(trial().suggest_*): kept under {SUGGESTED_KEY}:, which "
            "hpo_framework.load_best(FILE) hands back to trial().suggest_*", err=True,
        )  # fmt: skip
    click.echo(f"wrote {path}: the complete cfg of the best trial of {study!r}")


def _write_plots(rdb: Any, study: str, plot_dir: str, top: int) -> None:
    """``--plot DIR``: PNG and HTML plots and an index.html."""
    from hpo_framework.views.plots import write_plots  # plotting libraries only when asked for

    summary = summarize(rdb, study, top=top, all_trials=True)
    loaded = optuna.load_study(study_name=study, storage=rdb)
    files = write_plots(
        loaded,
        Path(plot_dir),
        summary,
        progress=lambda t: click.echo(f"plotting {t}", err=True),
        histories=metric_histories(rdb, study),
    )
    click.echo(f"wrote {len(files)} files; open {Path(plot_dir) / 'index.html'}")
