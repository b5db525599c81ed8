"""A TCP proxy in front of PostgreSQL that injects the faults a network and a failover do.

It speaks just enough of the wire protocol to see each simple query the client sends
(psycopg2 sends every statement, BEGIN and COMMIT as one) and each ReadyForQuery the server
answers with, so it can:

* ``lose_answer(*parts)``: let the next query containing every one of ``parts`` reach the
  server and run (and commit, in autocommit), then drop the server's answer and cut that
  connection: the client never learns that its step succeeded;
* ``lose_commit_after(*parts)``: the same for the COMMIT that ends the transaction in which
  such a query ran;
* ``freeze_after(pattern, seconds)``: hold the server's answer to such a query for a while,
  as if the client process had been stopped right after sending it;
* ``outage(seconds)``: cut every connection and refuse new ones for a while.

Clients must connect with ``sslmode=disable`` (``url`` adds it).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field


@dataclass
class _Rule:
    parts: tuple[str, ...]
    times: int
    freeze_s: float = 0.0  # 0: lose the answer; > 0: hold it this long
    at_commit: bool = False  # lose the answer to the COMMIT that follows, not to this query
    hits: int = 0


@dataclass
class _Link:
    client: socket.socket
    server: socket.socket
    lose_until_ready: bool = False
    armed: _Rule | None = None  # a lose_commit_after rule waiting for this link's COMMIT
    frozen_until: float = 0.0
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for s in (self.client, self.server):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        self._rules: list[_Rule] = []
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._refuse_until = 0.0
        self._stopped = False
        self.lost_answers = 0
        self.frozen_answers = 0
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return (
            f"postgresql+psycopg2://{user}@127.0.0.1:{self.port}/{database}"
            "?sslmode=disable&gssencmode=disable"
        )

    # --- faults --------------------------------------------------------------------------------

    def lose_answer(self, *parts: str, times: int = 1) -> None:
        with self._lock:
            self._rules.append(_Rule(parts, times))

    def lose_commit_after(self, *parts: str, times: int = 1) -> None:
        with self._lock:
            self._rules.append(_Rule(parts, times, at_commit=True))

    def freeze_after(self, *parts: str, seconds: float, times: int = 1) -> None:
        with self._lock:
            self._rules.append(_Rule(parts, times, freeze_s=seconds))

    def pending(self) -> int:
        """Faults armed and not yet injected."""
        with self._lock:
            return sum(r.times - r.hits for r in self._rules)

    def outage(self, seconds: float) -> None:
        """Cut every connection now and refuse new ones for ``seconds``."""
        with self._lock:
            self._refuse_until = time.monotonic() + seconds
            links, self._links = self._links, []
        for link in links:
            link.close()

    def close(self) -> None:
        self._stopped = True
        self.outage(0)
        self._listener.close()

    # --- relaying ------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() < self._refuse_until:
                client.close()  # the server is "down"
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):  # relay each message at once (no Nagle delay)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, server)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=self._client_to_server, args=(link,), daemon=True).start()
            threading.Thread(target=self._server_to_client, args=(link,), daemon=True).start()

    def _match(self, query: str) -> _Rule | None:
        """The first rule with injections left that ``query`` matches; a hit is counted when
        the fault is injected (for ``lose_commit_after``: when its COMMIT comes)."""
        with self._lock:
            for rule in self._rules:
                if rule.hits < rule.times and all(p in query for p in rule.parts):
                    if not rule.at_commit:
                        rule.hits += 1
                    return rule
        return None

    def _commit(self, link: _Link) -> bool:
        """Whether this COMMIT's answer is to be lost (its link was armed, injections left)."""
        rule, link.armed = link.armed, None
        with self._lock:
            if rule is None or rule.hits >= rule.times:
                return False
            rule.hits += 1
            return True

    def report(self) -> list[str]:
        """The armed faults, with how many of each were injected."""
        with self._lock:
            return [f"{' & '.join(r.parts)}: {r.hits}/{r.times}" for r in self._rules]

    def _client_to_server(self, link: _Link) -> None:
        try:
            # Startup: an untyped packet, possibly an SSL/GSS request answered by one byte.
            while True:
                head = _read(link.client, 8)
                length, code = struct.unpack("!ii", head)
                body = _read(link.client, length - 8)
                link.server.sendall(head + body)
                if code not in (80877103, 80877104):  # SSLRequest, GSSENCRequest
                    break
            while True:
                kind = _read(link.client, 1)
                (length,) = struct.unpack("!i", _read(link.client, 4))
                body = _read(link.client, length - 4)
                if kind == b"Q":
                    query = body.rstrip(b"\0").decode("utf-8", "replace")
                    word = query.strip().upper()
                    rule = None if word in ("COMMIT", "ROLLBACK") else self._match(query)
                    if word == "COMMIT" and self._commit(link):
                        link.lose_until_ready = True
                        self.lost_answers += 1
                    elif word == "ROLLBACK":
                        link.armed = None
                    if rule is not None and rule.at_commit:
                        link.armed = link.armed or rule
                    elif rule is not None and rule.freeze_s > 0:
                        link.frozen_until = time.monotonic() + rule.freeze_s
                        self.frozen_answers += 1
                    elif rule is not None:
                        link.lose_until_ready = True
                        self.lost_answers += 1
                link.server.sendall(kind + struct.pack("!i", length) + body)
        except (OSError, ConnectionError, struct.error):
            link.close()

    def _server_to_client(self, link: _Link) -> None:
        try:
            first = link.server.recv(1, socket.MSG_PEEK)
            if first == b"N" or first == b"S":  # the one-byte answer to an SSL/GSS request
                link.client.sendall(_read(link.server, 1))
            while True:
                kind = _read(link.server, 1)
                (length,) = struct.unpack("!i", _read(link.server, 4))
                body = _read(link.server, length - 4)
                while time.monotonic() < link.frozen_until:
                    time.sleep(0.05)
                if link.lose_until_ready:
                    if kind == b"Z":  # the server is done with the query: now cut the line
                        link.close()
                        return
                    continue
                link.client.sendall(kind + struct.pack("!i", length) + body)
        except (OSError, ConnectionError, struct.error):
            link.close()


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data
