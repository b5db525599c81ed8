"""Where studies live: URL resolution, engine settings, schema creation and database retries.

Every entry point resolves the URL with :func:`resolve_storage_url` and opens it with
:func:`open_storage`; database-driver errors become :class:`StorageError` here and only here.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

import optuna
import sqlalchemy
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from hpo_framework import defaults
from hpo_framework.exceptions import StorageError

log = logging.getLogger("hpo.storage")
T = TypeVar("T")

#: Errors that mean "the database is not reachable right now", worth waiting out.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    optuna.exceptions.StorageInternalError,
)


def resolve_storage_url(explicit: str | None = None, config_storage: str | None = None) -> str:
    """``--storage``/argument > env ``HPO_STORAGE`` > config ``storage:`` > ``sqlite:///hpo.db``."""
    for candidate in (explicit, os.environ.get(defaults.STORAGE_ENV), config_storage):
        if candidate:
            return candidate
    return defaults.STORAGE_URL


#: Query parameters that carry a secret (``?password=...``), masked like the password.
_SECRET_QUERY = re.compile(r"([?&][^=&]*(?:password|passwd|pwd|secret|token)[^=&]*=)[^&]*", re.I)


def redact(url: str) -> str:
    """The URL as it may be printed: the password (also one in the query) replaced by ``***``."""
    try:
        text = make_url(url).render_as_string(hide_password=True)
        return _SECRET_QUERY.sub(r"\1***", text)
    except Exception:  # unparsable: show no more than the scheme, which holds no secret
        return url.split("://", 1)[0] + "://..." if "@" in url else url


def check_url(url: str) -> str:
    """The URL if it parses as a database URL; StorageError (password hidden) if not."""
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise StorageError(f"storage URL {redact(url)!r} is not a database URL") from None
    if parsed.drivername in ("postgres", "postgres+psycopg2"):
        raise StorageError(
            f"storage URL {redact(url)!r}: SQLAlchemy does not know 'postgres://'; "
            "write postgresql+psycopg2://..."
        )
    return url


def open_storage(
    url: str, *, create_schema: bool, role: str = "hpo"
) -> optuna.storages.RDBStorage:
    """An RDBStorage with the framework's engine settings.

    ``create_schema`` is for the coordinator and local runs only: workers never create tables,
    so that many of them starting on an empty database cannot race (Optuna issue #1092).
    """
    parsed = make_url(check_url(url))
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        _prepare_sqlite(parsed.database)
    # Processes that create the schema at the same moment collide ("alembic_version already
    # exists", Optuna #1092); the loser finds the tables made by the winner on its next try.
    tries = 5 if create_schema else 1
    for attempt in range(1, tries + 1):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs(backend, role, parsed.database),
                skip_table_creation=not create_schema,
            )
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            if attempt == tries:
                raise StorageError(f"cannot open storage {redact(url)}: {_reason(e)}") from e
            time.sleep(0.2 * attempt * random.random())
        except ImportError as e:
            raise StorageError(f"no database driver for {redact(url)}: {e}") from e
        except RuntimeError as e:  # Optuna's schema-version mismatch
            raise StorageError(f"storage {redact(url)}: {_reason(e)}") from e
    raise AssertionError("unreachable")


def schema_exists(url: str) -> bool:
    """Whether the coordinator has created the tables yet (a cheap check, no table creation)."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    return {"studies", "trials", "version_info", "hpo_studies"} <= tables


def engine_kwargs(backend: str, role: str, database: str | None = None) -> dict[str, Any]:
    """Connection settings: at most two connections a process, keepalives, a name per process."""
    if backend == "sqlite" and database in (None, "", ":memory:"):
        return {}  # one in-process database: SQLAlchemy's singleton pool, nothing to tune
    kwargs: dict[str, Any] = {
        "pool_size": defaults.POOL_SIZE,
        "max_overflow": defaults.POOL_MAX_OVERFLOW,
        "pool_timeout": defaults.POOL_TIMEOUT_S,
    }
    if backend == "sqlite":
        kwargs["connect_args"] = {"timeout": defaults.SQLITE_BUSY_TIMEOUT_S}
    elif backend == "postgresql":
        kwargs["connect_args"] = {
            "application_name": f"{role}:{socket.gethostname()}:{os.getpid()}"[:63],
            "connect_timeout": 10,
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }
    return kwargs


def with_db_retry(op: Callable[[], T], what: str, deadline: float | None = None) -> T:
    """Run ``op``, waiting out database outages with capped exponential backoff and jitter.

    Used around every database step of a worker, so a dropped connection or a server restart
    delays work instead of ending it. Gives up (StorageError) after ``DB_RETRY_DEADLINE``.
    """
    give_up = time.monotonic() + (defaults.DB_RETRY_DEADLINE if deadline is None else deadline)
    wait = 0.1
    failures = 0
    while True:
        try:
            result = op()
        except TRANSIENT_ERRORS as e:
            failures += 1
            if time.monotonic() + wait > give_up:
                raise StorageError(f"database unavailable while {what}: {_reason(e)}") from e
            if failures == 1 or failures % 10 == 0:
                log.warning("database unavailable while %s (%s); retrying", what, _reason(e))
            time.sleep(wait * (0.5 + random.random()))
            wait = min(wait * 2, defaults.DB_RETRY_MAX_WAIT)
            continue
        if failures:
            log.warning("database is back; %s succeeded after %d retries", what, failures)
        return result


def _prepare_sqlite(database: str | None) -> None:
    """WAL lets readers and one writer work at once; it is a property of the file, set once."""
    if not database or database == ":memory:":
        return
    with sqlite3.connect(database, timeout=defaults.SQLITE_BUSY_TIMEOUT_S) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


def _reason(e: BaseException) -> str:
    inner = getattr(e, "orig", None) or e.__cause__ or e
    text = " ".join(str(inner).split())
    return text[:300] if text else type(inner).__name__
