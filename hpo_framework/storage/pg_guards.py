"""The guards of every hpo connection to PostgreSQL, directly or through a pooler.

Three settings keep a pool of workers safe on a shared server: ``lock_timeout`` (no statement
waits long on a lock), ``idle_in_transaction_session_timeout`` (a frozen process holds its
locks a few seconds at most) and ``TimeZone=UTC`` (one clock). On a direct connection they
are startup options: they cost no statement.

A transaction pooler such as PgBouncer hands each transaction to whichever server connection
is free, so session settings do not follow a client. With its default settings it refuses the
startup option outright ("unsupported startup parameter: options"). When a connection is
refused that way, the engine connects again without the option and sends the three settings
as ``SET LOCAL`` at the start of each transaction instead. That is one more round trip per
transaction, behind a pooler only. Reads in autocommit take no lock and need none. psycopg 3's
automatic server-side prepared statements are switched off there too, because a prepared
statement lives on one server connection only.

A pooler configured to drop the option silently (``ignore_startup_parameters = options``)
looks like a direct connection: the guards are then gone. Leave that setting out.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy
from sqlalchemy import event

from hpo_framework import defaults

log = logging.getLogger("hpo.storage")

_SETTINGS = (
    ("lock_timeout", f"{int(defaults.PG_LOCK_TIMEOUT_S * 1000)}"),
    (
        "idle_in_transaction_session_timeout",
        f"{int(defaults.PG_IDLE_IN_TRANSACTION_TIMEOUT_S * 1000)}",
    ),
    ("TimeZone", "UTC"),
)
#: The startup option of a direct connection.
STARTUP_OPTIONS = " ".join(f"-c {name}={value}" for name, value in _SETTINGS)
#: The same settings for one transaction, in one round trip.
_PER_TRANSACTION = "; ".join(f"SET LOCAL {name} = '{value}'" for name, value in _SETTINGS)
_POOLER_FLAG = "_hpo_behind_pooler"  # set on an engine's dialect once a pooler refused options


def behind_pooler(engine: sqlalchemy.Engine) -> bool:
    """Whether this engine found a transaction pooler that refuses startup options."""
    return bool(getattr(engine.dialect, _POOLER_FLAG, False))


def per_transaction(engine: sqlalchemy.Engine) -> str | None:
    """The guards' ``SET LOCAL`` statement a raw transaction on ``engine`` must begin with
    (behind a pooler), or None (a direct connection has them for its whole session)."""
    return _PER_TRANSACTION if behind_pooler(engine) else None


def _refused_options(error: BaseException) -> bool:
    return "unsupported startup parameter" in str(error) and "options" in str(error)


@event.listens_for(sqlalchemy.engine.Engine, "do_connect")
def _connect(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
    if cparams.get("options") != STARTUP_OPTIONS:
        return None  # not an hpo connection: SQLAlchemy connects as usual
    if not getattr(dialect, _POOLER_FLAG, False):
        try:
            return dialect.connect(*cargs, **cparams)
        except Exception as e:
            if not _refused_options(e):
                raise
            setattr(dialect, _POOLER_FLAG, True)
            log.info(
                "the server refuses startup options (a transaction pooler such as PgBouncer): "
                "lock_timeout, idle_in_transaction_session_timeout and TimeZone are set per "
                "transaction instead"
            )
    # A copy: SQLAlchemy 2.0 hands every connect the same dict.
    connection = dialect.connect(*cargs, **{k: v for k, v in cparams.items() if k != "options"})
    if hasattr(connection, "prepare_threshold"):  # psycopg 3
        connection.prepare_threshold = None
    return connection


@event.listens_for(sqlalchemy.engine.Engine, "begin")
def _begin(conn: sqlalchemy.Connection) -> None:
    if not getattr(conn.dialect, _POOLER_FLAG, False):
        return
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return
    conn.exec_driver_sql(_PER_TRANSACTION)
