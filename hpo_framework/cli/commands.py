"""``hpo-coordinator``: thin click adapters over the library (``hpo-inspect``: ``inspecting``)."""

from __future__ import annotations

import shlex
import sys
from typing import Any

import click
import optuna
import yaml

from hpo_framework.cli.inspecting import inspect_command
from hpo_framework.cli.options import (
    CONTEXT,
    config_storage_option,
    require_hpo_schema,
    require_sqlite_file,
    set_option,
    storage_option,
    translate_errors,
    version_option,
)
from hpo_framework.cli.render import make_console, print_study_list, print_summary
from hpo_framework.config.schema import load_config, read_yaml_file
from hpo_framework.exceptions import ConfigError
from hpo_framework.operations.coordinator import (
    check_config,
    create_study,
    delete_study,
    stop_study,
)
from hpo_framework.operations.day2 import enqueue_points, move, retry_failed, set_limits
from hpo_framework.storage.database import (
    check_url,
    open_storage,
    redact,
    resolve_storage_url,
)
from hpo_framework.views.inspection import list_studies, summarize
from hpo_framework.views.watch import watch as watch_study

__all__ = ["coordinator", "inspect_command"]


def _open(storage: str | None, config_storage: str | None = None, create: bool = False) -> Any:
    """The storage; for the reading commands, one line (and no new SQLite file) when it holds
    no hpo study yet."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = check_url(resolve_storage_url(storage, config_storage))
    if not create:
        require_hpo_schema(url)
    return open_storage(url, create_schema=create, role="hpo-cli")


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
    require_sqlite_file(url)  # an empty server database is served (compose starts it first)
    serve(url, host, port)
