"""What every command-line tool shares: the ``--storage`` option and error translation."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from hpo_framework import defaults
from hpo_framework._version import __version__
from hpo_framework.exceptions import HPOError

F = TypeVar("F", bound=Callable[..., Any])

storage_option = click.option(
    "--storage",
    envvar=defaults.STORAGE_ENV,
    metavar="URL",
    help=f"Database URL [env {defaults.STORAGE_ENV}; default {defaults.STORAGE_URL}].",
)

#: ``create`` also reads the config's ``storage:``.
config_storage_option = click.option(
    "--storage",
    envvar=defaults.STORAGE_ENV,
    metavar="URL",
    help=f"Database URL [env {defaults.STORAGE_ENV}; default: the config's storage:, "
    f"else {defaults.STORAGE_URL}].",
)


#: ``--version`` on every command: the installed package's version.
#: ``--set KEY.PATH=VALUE`` of the commands that read a config (create, check, run).
set_option = click.option(
    "--set", "assignments", multiple=True, metavar="KEY.PATH=VALUE",
    help="Override a config value, e.g. --set study.n_trials=8 (read as YAML; repeatable).",
)  # fmt: skip
version_option = click.version_option(version=__version__, message="%(prog)s (hpo) %(version)s")


class CommandError(click.ClickException):
    """An HPOError as click shows it: ``Error: <one line>`` and the error's exit status."""

    def __init__(self, error: HPOError) -> None:
        super().__init__(str(error))
        self.exit_code = error.exit_code  # type: ignore[misc]


def translate_errors(fn: F) -> F:
    """Library errors become one-line click errors with the right exit status, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HPOError as e:
            raise CommandError(e) from None

    return wrapper  # type: ignore[return-value]
