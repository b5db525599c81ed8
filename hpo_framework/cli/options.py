"""What every command-line tool shares: the ``--storage`` option, the checks before a command
opens a database it only reads, and error translation."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from hpo_framework import defaults
from hpo_framework._version import __version__
from hpo_framework.exceptions import HPOError, StorageError
from hpo_framework.storage.database import cannot_open, redact, schema_exists

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"help_option_names": ["-h", "--help"]}

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


_CREATE_HINT = "create one with `hpo-coordinator create config.yaml`, or pass --storage"


def require_sqlite_file(url: str) -> None:
    """A SQLite URL must name an existing file: opening it would create an empty one."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).exists():
            raise StorageError(f"no database at {redact(url)}: {_CREATE_HINT}")


def require_hpo_schema(url: str) -> None:
    """One line (and no new SQLite file) when ``url`` holds no hpo study yet."""
    require_sqlite_file(url)
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
