"""Real backends for every test: SQLite files in tmp_path and fresh PostgreSQL databases.

PostgreSQL comes from ``HPO_TEST_PG_URL`` (default: the local server, trust auth); each test
that asks for it gets a database of its own, dropped afterwards. Without a server the tests
skip locally, but under ``CI=true`` they fail: a missing service must never pass silently.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "HPO_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
BIN = Path(sys.executable).parent
# The checkpoint stores' fixtures (a directory, or a bucket on a real S3-compatible server).
pytest_plugins = ["tests.checkpoint_stores"]


def _pg_available() -> str | None:
    engine = sa.create_engine(PG_ADMIN_URL, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        return None
    except sa.exc.OperationalError as e:
        return str(e).splitlines()[0]
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[sa.Engine]:
    problem = _pg_available()
    if problem:
        missing_service(f"PostgreSQL unreachable at {PG_ADMIN_URL}: {problem}")
    engine = sa.create_engine(
        PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
    )
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url(pg_admin: sa.Engine) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test."""
    name = f"hpo_test_{uuid.uuid4().hex[:10]}"
    with pg_admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name)
    yield url.render_as_string(hide_password=False)
    end_started_workers()
    with pg_admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["psycopg2", "psycopg"])
def pg_driver_url(request: pytest.FixtureRequest, pg_url: str) -> str:
    """A fresh PostgreSQL database through each driver: psycopg2 (the default) and psycopg 3."""
    url = sa.engine.make_url(pg_url).set(drivername=f"postgresql+{request.param}")
    return url.render_as_string(hide_password=False)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hpo.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hpo.db'}"
    return str(request.getfixturevalue("pg_url"))


def make_config(**overrides: Any) -> dict[str, Any]:
    """A small valid config; ``study``/``search_space``... replace the defaults' sections."""
    config: dict[str, Any] = {
        "study": {
            "name": "test-study",
            "direction": "minimize",
            "n_trials": 6,
            "sampler": {"name": "tpe", "seed": 1, "options": {"n_startup_trials": 3}},
            "heartbeat_interval": 1,
            "grace_period": 3,
        },
        "session": "tests.sessions:quadratic",
        "static": {},
        "search_space": {"x": {"type": "float", "low": -5.0, "high": 5.0}},
    }
    for key, value in overrides.items():
        if key == "study_":
            config["study"].update(value)
        else:
            config[key] = value
    return config


def write_config(path: Path, config: dict[str, Any] | str) -> Path:
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    path.write_text(textwrap.dedent(text) if isinstance(config, str) else text)
    return path


def cli_env(url: str | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["HPO_SESSION_MODULES"] = "experiments,tests.sessions,tests.broken_session"
    if url is not None:
        env["HPO_STORAGE"] = url
    env.update(extra)
    return env


def run_cli(
    *args: str, url: str | None = None, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run one of the console scripts as a real process from the repository root."""
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], cwd=ROOT, env=cli_env(url, **env),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_STARTED: list[subprocess.Popen[str]] = []


def start_worker(
    *args: str, url: str, log: Path | None = None, **env: str
) -> subprocess.Popen[str]:
    """An ``hpo-worker`` process; the ``_end_workers`` fixture ends it if the test does not."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [str(BIN / "hpo-worker"), *args], cwd=ROOT, env=cli_env(url, **env),
        stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    _STARTED.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _end_workers() -> Iterator[None]:
    """Every worker a test started is gone when it ends, passed or failed (with its pool
    children and sessions: each worker leads its own process group)."""
    yield
    end_started_workers()


def end_started_workers() -> None:
    """Kill the workers this test started. Also called before a test's database is dropped,
    so that none is left retrying a database that is gone."""
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
            proc.wait(timeout=60)


@pytest.fixture(autouse=True)
def _session_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs may import the tests' own sessions, as the worker processes do."""
    monkeypatch.setenv("HPO_SESSION_MODULES", "experiments,tests.sessions,tests.broken_session")
    monkeypatch.delenv("HPO_STORAGE", raising=False)
    monkeypatch.chdir(ROOT)


def missing_service(message: str) -> NoReturn:
    """A service a test needs is missing: under CI=true that fails the test, else it skips."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def private_pg() -> Iterator[Any]:
    """A PostgreSQL server of this test's own, which it may restart."""
    from tests.private_postgres import PrivatePostgres

    try:
        server = PrivatePostgres()
        server.start()
    except (RuntimeError, subprocess.CalledProcessError, FileNotFoundError) as e:
        missing_service(f"cannot start a private PostgreSQL: {e}")
    yield server
    end_started_workers()
    server.cleanup()


@pytest.fixture
def pgbouncer(pg_url: str) -> Iterator[Any]:
    """A PgBouncer of this test's own (transaction pooling, 24 server connections at most) in
    front of the test's PostgreSQL server; ``pgbouncer.url(database)`` goes through it."""
    from tests.pgbouncer import PgBouncer

    try:
        bouncer = PgBouncer(pg_url, pool_size=24)
        bouncer.start()
    except (RuntimeError, OSError) as e:
        missing_service(f"cannot start PgBouncer: {e}")
    yield bouncer
    end_started_workers()
    bouncer.cleanup()
