"""Where studies live: URL resolution, engine settings, schema creation and database retries.

Every entry point resolves the URL with :func:`resolve_storage_url` and opens it with
:func:`open_storage`; database-driver errors become :class:`StorageError` here and only here.

The retry policy lives here too, and the storage layer applies it: a method that is a whole
database step is marked :func:`retried`, and a caller outside ``storage`` just calls it. Steps
nest (a retried step may call others); only the outermost one waits out an outage and runs
again, so a step is replayed as the unit whose idempotency it promises.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import random
import re
import socket
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, TypeVar, cast

import sqlalchemy
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from hpo_framework import defaults
from hpo_framework.exceptions import StorageError
from hpo_framework.storage import pg_guards

if TYPE_CHECKING:
    import optuna

log = logging.getLogger("hpo.storage")
T = TypeVar("T")

#: Exception types that may mean "the database is not reachable right now"; which of them
#: really do is decided by :func:`is_transient`.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
)

#: SQLSTATE classes and codes worth waiting out: connection exceptions (08), insufficient
#: resources (53, e.g. too many connections), operator intervention (57: shutdown, restart,
#: cancel), transaction rollback (40: serialization failure, deadlock), lock not available
#: (55P03, our lock_timeout), and sessions the server ended (25P03 idle in transaction).
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "40")
_TRANSIENT_SQLSTATES = ("55P03", "25P03", "58030")


def is_server_full(error: BaseException) -> bool:
    """Whether the server refused a connection for want of a free one (``max_connections``
    reached, SQLSTATE 53300): it is up, and a connection frees as others finish."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "pgcode", None) or getattr(current, "sqlstate", None)
        text = str(current)
        if (
            code == "53300"
            or "too many clients" in text
            or "connection slots are reserved" in text
        ):
            return True
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return False


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` is a connection-level failure (retry) rather than a refusal of what
    was asked (fail at once: retrying a "value too long" only wastes the retry deadline).

    Optuna wraps every SQLAlchemy error as StorageInternalError, so the cause chain is
    walked down to the driver's error and classified by its SQLSTATE or disconnect flag.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sqlalchemy.exc.TimeoutError):  # no pooled connection free
            return True
        if isinstance(current, sqlalchemy.exc.DBAPIError):
            if current.connection_invalidated:
                return True
            current = current.orig
            continue
        code = getattr(current, "pgcode", None) or getattr(current, "sqlstate", None)
        if code:
            return code[:2] in _TRANSIENT_SQLSTATE_CLASSES or code in _TRANSIENT_SQLSTATES
        if isinstance(current, sqlite3.OperationalError):
            text = str(current).lower()
            return "locked" in text or "busy" in text or "unable to open" in text
        if type(current).__module__.startswith("psycopg") and type(current).__name__ in (
            "OperationalError", "InterfaceError",
        ):  # fmt: skip
            return True  # no SQLSTATE: the connection failed or closed (server gone, reset)
        current = current.__cause__ or current.__context__
    return False


class DatabaseHealth:
    """How long this process has reached the database without a failure.

    A sweeper judges other workers' silence only once it has itself been connected for their
    whole grace period: a silence that may have been the database's outage (or this
    process's cut link) is no evidence that a worker is lost.
    """

    def __init__(self) -> None:
        self._since: float | None = None

    def ok(self) -> None:
        if self._since is None:
            self._since = time.monotonic()

    def failed(self) -> None:
        self._since = None

    @property
    def reachable(self) -> bool:
        """Whether this process's last database step succeeded."""
        return self._since is not None

    def connected_for(self) -> float:
        since = self._since
        return 0.0 if since is None else time.monotonic() - since


DB_HEALTH = DatabaseHealth()


def resolve_storage_url(explicit: str | None = None, config_storage: str | None = None) -> str:
    """``--storage``/argument > env ``HPO_STORAGE`` > config ``storage:`` > ``sqlite:///hpo.db``."""
    for candidate in (explicit, os.environ.get(defaults.STORAGE_ENV), config_storage):
        if candidate:
            return candidate
    return defaults.STORAGE_URL


#: Query parameters that carry a secret (``?password=...``), masked like the password.
_SECRET_QUERY = re.compile(r"([?&][^=&]*(?:password|passwd|pwd|secret|token)[^=&]*=)[^&]*", re.I)


def redact(url: str) -> str:
    """The URL as it may be printed: the password (also one in the query) replaced by ``***``.

    Everything between the user name's ``:`` and the *last* ``@`` is the password, so one
    holding an unencoded ``@``, ``:`` or ``/`` is hidden whole too (a URL parser would split
    it at its first ``@`` and print the rest as the host)."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, _, tail = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}{':***' if colon else ''}@{tail}"
    return _SECRET_QUERY.sub(r"\1***", f"{scheme}{sep}{rest}")


def password_of(url: str) -> str | None:
    """The password as written in the URL (see :func:`redact`), or None."""
    _, sep, rest = url.partition("://")
    userinfo = rest.rpartition("@")[0] if sep else ""
    user, colon, password = userinfo.partition(":")
    return password if colon and password else None


def cannot_open(url: str, e: BaseException, reason: str) -> StorageError:
    """ "cannot open storage URL: reason", the password hidden in both (a driver's message may
    quote the part of a password it took for the host), and a hint when the password holds
    characters that must be percent-encoded."""
    return StorageError(
        f"cannot open storage {redact(url)}: {scrub(url, reason)}{_encoding_hint(url)}"
    )


def scrub(url: str, text: str) -> str:
    """A driver's message with the URL's password hidden: it may quote the part of a password
    holding an unencoded ``@`` that it took for the host."""
    password = password_of(url)
    if password:
        for piece in sorted({password, *re.split(r"[@:/]", password)}, key=len, reverse=True):
            if len(piece) >= 3:
                text = text.replace(piece, "***")
        text = re.sub(r"[^\s\"'@]+@", "***@", text)  # "x@127.0.0.1": the password's end
    return text


def _encoding_hint(url: str) -> str:
    """A hint for a password holding what a URL must percent-encode, or ""."""
    if not re.search(r"[@:/?#]", password_of(url) or ""):
        return ""
    return (
        " (the password holds @, :, /, ? or #: percent-encode them in the URL, "
        "@ as %40, : as %3A, / as %2F, ? as %3F, # as %23)"
    )


def check_url(url: str) -> str:
    """The URL if it parses as a database URL; StorageError (password hidden) if not."""
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):  # ValueError: a port that is no number
        raise StorageError(
            f"storage URL {redact(url)!r} is not a database URL{_encoding_hint(url)}"
        ) from None
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
    import optuna

    parsed = make_url(check_url(url))
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        _prepare_sqlite(parsed.database)
    # Processes that create the schema at the same moment collide ("alembic_version already
    # exists", Optuna #1092); the loser finds the tables made by the winner on its next try.
    tries = 5 if create_schema else 1
    for attempt in range(1, tries + 1):
        try:
            if not create_schema:
                return _open_existing(url, engine_kwargs(backend, role, parsed.database))
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs(backend, role, parsed.database)
            )
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            if attempt == tries:
                raise cannot_open(url, e, _reason(e)) from e
            time.sleep(0.2 * attempt * random.random())
        except ImportError as e:
            raise StorageError(f"no database driver for {redact(url)}: {e}") from e
        except RuntimeError as e:  # Optuna's schema-version mismatch
            raise StorageError(f"storage {redact(url)}: {_reason(e)}") from e
    raise AssertionError("unreachable")


def open_engine(url: str, *, role: str = "hpo") -> sqlalchemy.Engine:
    """An engine on tables the coordinator made, with the framework's settings and Optuna's
    schema revision checked: what the read side (``hpo-inspect``) needs, without Optuna."""
    parsed = make_url(check_url(url))
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        _prepare_sqlite(parsed.database)
    try:
        engine = sqlalchemy.create_engine(url, **engine_kwargs(backend, role, parsed.database))
        _check_schema_revision(engine)
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise cannot_open(url, e, _reason(e)) from e
    except ImportError as e:
        raise StorageError(f"no database driver for {redact(url)}: {e}") from e
    except RuntimeError as e:
        raise StorageError(f"storage {redact(url)}: {_reason(e)}") from e
    return engine


#: The schema revision of the Optuna range in pyproject.toml (``tests/pool/test_db_cost.py`` checks
#: it against Optuna's own): workers check it with one query instead of importing alembic.
OPTUNA_SCHEMA_HEAD = "v3.2.0.a"


@functools.cache
def _existing_schema_storage() -> type[optuna.storages.RDBStorage]:
    import optuna
    import sqlalchemy.orm

    class ExistingSchemaStorage(optuna.storages.RDBStorage):
        """``RDBStorage`` on tables the coordinator made, without Optuna's version manager: it
        imports alembic (about 0.15 s of a worker's start) only to compare one revision string."""

        def __init__(self, url: str, engine_kwargs: dict[str, Any]) -> None:
            # The attributes RDBStorage.__init__ sets (the test compares the two).
            self.engine_kwargs = engine_kwargs
            self.url = url
            self.skip_compatibility_check = True
            self.heartbeat_interval = self.grace_period = None
            self.heartbeat_stale_trial_callback = self.failed_trial_callback = None
            self.engine = sqlalchemy.create_engine(url, **engine_kwargs)
            self.scoped_session = sqlalchemy.orm.scoped_session(
                sqlalchemy.orm.sessionmaker(bind=self.engine)
            )
            self._version_manager = None  # type: ignore[assignment]

    return ExistingSchemaStorage


def _open_existing(url: str, kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    import sqlalchemy.orm

    storage = _existing_schema_storage()(url, kwargs)
    # SQLAlchemy configures Optuna's ORM mappers on their first query, ~60 ms of CPU: a worker
    # does it now, while it waits for work, not when every worker of a new study starts at once.
    sqlalchemy.orm.configure_mappers()
    _check_schema_revision(storage.engine)
    return storage


def _check_schema_revision(engine: sqlalchemy.Engine) -> None:
    with engine.connect() as conn:
        found = conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar()
    if found != OPTUNA_SCHEMA_HEAD:
        engine.dispose()
        raise RuntimeError(
            f"the tables are at Optuna schema revision {found}, this Optuna "
            f"{version('optuna')} needs {OPTUNA_SCHEMA_HEAD}: run `optuna storage upgrade "
            "--storage URL` (or use the Optuna version that made them)"
        )


_TABLE_NAMES = {
    "postgresql": "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()",
    "sqlite": "SELECT name FROM sqlite_master WHERE type = 'table'",
}


def schema_exists(url: str) -> bool:
    """Whether the coordinator has created the tables yet (one query, no table creation)."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        query = _TABLE_NAMES.get(engine.dialect.name)
        with engine.connect() as conn:
            if query is None:  # SQLAlchemy's reflection: slower to import and run, any database
                tables = set(sqlalchemy.inspect(conn).get_table_names())
            else:
                tables = set(conn.execute(sqlalchemy.text(query)).scalars())
    finally:
        engine.dispose()
    return {"studies", "trials", "alembic_version", "hpo_studies", "hpo_tickets"} <= tables


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
            "connect_timeout": defaults.PG_CONNECT_TIMEOUT_S,
            # A host lost mid-request is noticed in about a minute, not hours.
            "keepalives": 1,
            "keepalives_idle": defaults.PG_KEEPALIVE_IDLE_S,
            "keepalives_interval": defaults.PG_KEEPALIVE_INTERVAL_S,
            "keepalives_count": defaults.PG_KEEPALIVE_COUNT,
            "tcp_user_timeout": int(defaults.PG_TCP_USER_TIMEOUT_S * 1000),
            # No hpo session waits on a lock for long, none holds one while frozen, one clock;
            # behind a transaction pooler the same settings go per transaction (pg_guards).
            "options": pg_guards.STARTUP_OPTIONS,
        }
    return kwargs


#: Set by :func:`without_waiting`: an outage fails a step within a second (one retry on a
#: fresh connection) instead of being waited out.
_NO_WAIT_DEADLINE_S = 1.0
_NO_WAIT: contextvars.ContextVar[bool] = contextvars.ContextVar("hpo_db_no_wait", default=False)


@contextlib.contextmanager
def without_waiting() -> Iterator[None]:
    """Inside, ``with_db_retry`` gives a step one second, not minutes: a worker stopped cold
    (a second signal) records what it can and exits, rather than waiting out an outage."""
    token = _NO_WAIT.set(True)
    try:
        yield
    finally:
        _NO_WAIT.reset(token)


_stopping_since: float | None = None  # monotonic time of this process's first stop signal


def bound_retries_for_stop() -> None:
    """This process is stopping: from now on a database step waits out an outage at most
    ``STOP_DB_WAIT_S`` more (a stop must not hang on a database that is gone)."""
    global _stopping_since
    if _stopping_since is None:
        _stopping_since = time.monotonic()


#: Set while a step runs under :func:`with_db_retry`: a step it calls runs once, and the outer
#: one owns the waiting (a replay of the inner step alone could break the outer's idempotency).
_IN_STEP: contextvars.ContextVar[bool] = contextvars.ContextVar("hpo_db_in_step", default=False)


F = TypeVar("F", bound=Callable[..., Any])


def retried(what: str) -> Callable[[F], F]:
    """Mark a method as one database step. On an object whose ``patient`` attribute is true
    (a worker's storage) it runs under :func:`with_db_retry`, ``what`` naming it in the log
    and in the error; otherwise (a CLI command, which should say so rather than hang) once."""

    def mark(method: F) -> F:
        @functools.wraps(method)
        def step(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not self.patient:
                return method(self, *args, **kwargs)
            return with_db_retry(lambda: method(self, *args, **kwargs), what)

        return cast(F, step)

    return mark


def with_db_retry(op: Callable[[], T], what: str, deadline: float | None = None) -> T:
    """Run ``op``, waiting out database outages with capped exponential backoff and jitter.

    Used around every database step of a worker, so a dropped connection or a server restart
    delays work instead of ending it. Gives up (StorageError) after ``DB_RETRY_DEADLINE``.
    Only connection-level failures are retried (:func:`is_transient`); any other database
    error is a StorageError at once, with the database's reason. Steps run here must be
    idempotent: a step whose answer was lost is run again. Inside another step it runs once:
    the outer step is what is replayed.
    """
    if _IN_STEP.get():
        return op()
    token = _IN_STEP.set(True)
    try:
        return _retrying(op, what, deadline)
    finally:
        _IN_STEP.reset(token)


def _retrying(op: Callable[[], T], what: str, deadline: float | None) -> T:
    if _NO_WAIT.get():
        deadline = _NO_WAIT_DEADLINE_S
    started = time.monotonic()
    give_up = started + (defaults.DB_RETRY_DEADLINE if deadline is None else deadline)
    wait = 0.1
    failures = 0
    while True:
        try:
            result = op()
        except Exception as e:
            if not _is_database_error(e):
                raise  # not the database's (a finished trial, a deleted study): the caller's
            if not is_transient(e):
                raise StorageError(f"database refused {what}: {_reason(e)}") from e
            DB_HEALTH.failed()
            failures += 1
            if _stopping_since is not None:  # read each time: the signal may come mid-outage
                stop_by = max(_stopping_since, started) + defaults.STOP_DB_WAIT_S
                give_up = min(give_up, stop_by)
            if time.monotonic() + wait > give_up:
                raise StorageError(f"database unavailable while {what}: {_reason(e)}") from e
            if failures == 1 or failures % 10 == 0:
                log.warning("database unavailable while %s (%s); retrying", what, _reason(e))
            time.sleep(wait * (0.5 + random.random()))
            wait = min(wait * 2, defaults.DB_RETRY_MAX_WAIT)
            continue
        DB_HEALTH.ok()
        if failures:
            log.warning("database is back; %s succeeded after %d retries", what, failures)
        return result


def _is_database_error(e: BaseException) -> bool:
    """SQLAlchemy's and Optuna's wrappers, and a driver's own errors (which SQLAlchemy lets
    through where it resets a connection it returns to the pool)."""
    if isinstance(e, (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error)):
        return True
    optuna = sys.modules.get("optuna")  # not loaded (the read side): no Optuna error to meet
    if optuna is not None and isinstance(e, optuna.exceptions.StorageInternalError):
        return True
    return type(e).__module__.startswith("psycopg")


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
