"""A PgBouncer owned by one test, in front of the test's PostgreSQL server.

Its configuration is PgBouncer's defaults but for what any deployment must say: where it
listens, which server it fronts, who may log in, and transaction pooling with a small pool
(the mode that lets many clients share few server connections). In particular
``ignore_startup_parameters`` is left unset, so PgBouncer refuses the ``options`` startup
parameter as it does out of the box. PgBouncer refuses to run as root, so it runs as the
unprivileged ``postgres`` user when the tests run as root.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pgbouncer_binary() -> str | None:
    """Where the pgbouncer program is (Debian puts it in /usr/sbin), or None."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    return binary if os.path.exists(binary) else None


class PgBouncer:
    def __init__(self, upstream_url: str, pool_size: int) -> None:
        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError("pgbouncer not found (Debian: apt-get install pgbouncer)")
        upstream = sa.engine.make_url(upstream_url)
        self.upstream = upstream
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="hpo-pgbouncer-"))
        self.log = self.root / "pgbouncer.log"
        (self.root / "users.txt").write_text(f'"{upstream.username}" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={upstream.host or '127.0.0.1'} port={upstream.port or 5432}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.root / 'users.txt'}\n"
            f"logfile = {self.log}\npidfile = {self.root / 'pgbouncer.pid'}\n"
            f"pool_mode = transaction\ndefault_pool_size = {pool_size}\n"
            "max_client_conn = 1000\n"
        )
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres")
            for path in self.root.iterdir():
                shutil.chown(path, "postgres")
        self._binary = binary
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        through = self.upstream.set(host="127.0.0.1", port=self.port, database=database)
        return through.render_as_string(hide_password=False)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*self._as_user, self._binary, str(self.root / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("pgbouncer did not listen within 30 s")

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)
