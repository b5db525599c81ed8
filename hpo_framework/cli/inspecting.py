"""``hpo-inspect``: the read side's command. It opens an engine, not an Optuna storage, so that
a look at a study of one objective never imports Optuna (most of such a command's time);
``--watch`` and ``--plot`` use Optuna's storage, as does a study of several objectives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import sqlalchemy as sa
import yaml

from hpo_framework.cli.options import (
    CONTEXT,
    require_hpo_schema,
    storage_option,
    translate_errors,
    version_option,
)
from hpo_framework.cli.render import (
    FORMATS,
    make_console,
    metrics_view,
    print_summary,
    show,
    study_list_view,
    summary_view,
    trial_view,
    workers_view,
)
from hpo_framework.session.reporting import SUGGESTED_KEY
from hpo_framework.storage import metrics
from hpo_framework.storage.database import (
    check_url,
    open_engine,
    open_storage,
    resolve_storage_url,
)
from hpo_framework.views.inspection import (
    best_config,
    list_studies,
    metric_histories,
    summarize,
    trial_detail,
    worker_status,
)


def _open_engine(storage: str | None) -> sa.Engine:
    url = check_url(resolve_storage_url(storage))
    require_hpo_schema(url)
    return open_engine(url, role="hpo-cli")


def _open_storage(engine: sa.Engine) -> Any:
    """Optuna's storage on the same database, for what only Optuna does (watch, plots)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = engine.url.render_as_string(hide_password=False)
    return open_storage(url, create_schema=False, role="hpo-cli")


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
    db = _open_engine(storage)
    if (trial_number is not None or best_config_path or show_metrics) and study is None:
        raise click.UsageError("--trial, --best-config and --metrics need a STUDY")
    if show_metrics:
        show(metrics_view(metrics.long_rows(metric_histories(db, study or ""))), fmt, output)
    elif best_config_path:
        _write_best_config(db, study or "", best_config_path)
    elif trial_number is not None:
        show(trial_view(trial_detail(db, study or "", trial_number)), fmt, output)
    elif show_workers:
        if study or plot_dir or watch:
            raise click.UsageError("--workers takes no STUDY, --plot or --watch")
        show(workers_view(worker_status(db)), fmt, output)
    elif study is None:
        if plot_dir or watch:
            raise click.UsageError("--plot and --watch need a STUDY")
        show(study_list_view(list_studies(db)), fmt, output)
    elif watch:
        from hpo_framework.views.watch import watch as watch_study

        print_summary(watch_study(_open_storage(db), study, make_console(), top=top))
    elif plot_dir:
        _write_plots(db, study, plot_dir, top)
    else:
        show(summary_view(summarize(db, study, top=top, all_trials=fmt != "table")), fmt, output)


def _write_best_config(db: sa.Engine, study: str, path: str) -> None:
    """``--best-config FILE``: the best trial's complete cfg as YAML."""
    cfg, asked = best_config(db, study)
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


def _write_plots(db: sa.Engine, study: str, plot_dir: str, top: int) -> None:
    """``--plot DIR``: PNG and HTML plots and an index.html."""
    import optuna

    from hpo_framework.views.plots import write_plots  # plotting libraries only when asked for

    summary = summarize(db, study, top=top, all_trials=True)
    loaded = optuna.load_study(study_name=study, storage=_open_storage(db))
    files = write_plots(
        loaded,
        Path(plot_dir),
        summary,
        progress=lambda t: click.echo(f"plotting {t}", err=True),
        histories=metric_histories(db, study),
    )
    click.echo(f"wrote {len(files)} files; open {Path(plot_dir) / 'index.html'}")
