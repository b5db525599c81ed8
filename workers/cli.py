"""``hpo-worker``: a thin click adapter over ``Worker`` and ``run_pool``."""

from __future__ import annotations

import os
import sys

import click

from hpo_framework import defaults
from hpo_framework.cli.options import storage_option, translate_errors, version_option
from hpo_framework.logs import ensure_console_logging
from hpo_framework.runtime import health
from hpo_framework.runtime.executor import ProcessExecutor
from hpo_framework.storage.database import check_url, resolve_storage_url


def _gpu_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    gpus = [g.strip() for g in value.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus):
        raise click.BadParameter(f"expected GPU indices like 0,1,2; got {value!r}")
    return gpus


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@version_option
@storage_option
@click.option("--study", metavar="NAME", help="Serve only this study (default: every open one).")
@click.option(
    "--processes", type=click.IntRange(1, 1024), default=1, show_default=True,
    help="Worker processes to run on this host.",
)  # fmt: skip
@click.option(
    "--gpus",
    callback=_gpu_list,
    metavar="0,1,...",
    help="One process per GPU, each seeing only its own (CUDA_VISIBLE_DEVICES).",
)
@click.option(
    "--idle-exit", type=click.FloatRange(min=0), metavar="SECONDS",
    help="Exit 0 after this long without work (default: wait forever).",
)  # fmt: skip
@click.option(
    "--preload", metavar="MODULE,...", envvar=defaults.PRELOAD_ENV,
    help="Modules the session process imports as soon as it starts (e.g. torch, or your "
    "session's module), while the worker connects and waits for work "
    f"[env {defaults.PRELOAD_ENV}].",
)  # fmt: skip
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="One line per event as text, or one JSON object per line for log collectors.",
)  # fmt: skip
@click.option(
    "--check", is_flag=True,
    help="Exit 0 if a worker on this host is alive (its health file is fresh), else 1; "
    "for HEALTHCHECK and liveness probes.",
)  # fmt: skip
@click.option("--ready", is_flag=True, help="With --check: alive and reaching the database.")
@translate_errors
def main(
    storage: str | None, study: str | None, processes: int, gpus: list[str] | None,
    idle_exit: float | None, preload: str | None, log_format: str, check: bool, ready: bool,
) -> None:  # fmt: skip
    """Run trials of the studies in the storage; wait for studies when there are none.

    Needs nothing but the storage URL: the config and the session come from the database.
    The first SIGTERM/SIGINT finishes the running trial and exits 0; a second one fails it,
    re-queues its parameters and exits 1.
    """
    if check or ready:
        why = health.problem(health.health_file(), ready=ready)
        if why is not None:
            click.echo(f"unhealthy: {why}", err=True)
            sys.exit(1)
        click.echo("ready" if ready else "alive")
        return
    ensure_console_logging(fmt=log_format)
    if preload is not None:  # read by every executor this process and its pool children start
        os.environ[defaults.PRELOAD_ENV] = preload  # (--preload "" turns an inherited one off)
    url = check_url(resolve_storage_url(storage))
    kwargs = {"study": study, "idle_exit": idle_exit}
    if gpus or processes > 1:
        from workers.pool import run_pool

        sys.exit(run_pool(url, processes, gpus, **kwargs))
    # The session process starts first: it imports (and --preload's modules with it) while
    # this one imports the worker's own modules (Optuna, SQLAlchemy), on another core.
    executor = ProcessExecutor()
    executor.start()
    from workers.worker import run_worker

    sys.exit(run_worker(url, executor=executor, **kwargs))
