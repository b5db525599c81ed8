"""The two checkpoint stores of ``checkpoints:`` as tests see them: a shared directory, and a
bucket on a real S3-compatible HTTP server (moto's, started once per test session)."""

from __future__ import annotations

import contextlib
import pickle
import re
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN, free_port

#: What boto3 finds in a worker's environment (moto accepts any credentials).
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "hpo-test",
    "AWS_SECRET_ACCESS_KEY": "hpo-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class Store:
    """One study's checkpoint store: its ``checkpoints:`` section, the environment its workers
    need, and the saved checkpoints as name -> unpickled state."""

    config: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    _folder: Path | None = None
    _endpoint: str | None = None
    _bucket: str | None = None

    def saved(self) -> dict[str, Any]:
        """The checkpoints in the store by file name, each checked to lie where the README
        says: ``study-<id>/point-<n>.pkl`` under the directory, or under the S3 URL's prefix."""
        if self._folder is not None:
            blobs = {
                str(p.relative_to(self._folder)): p.read_bytes()
                for p in self._folder.rglob("*.pkl")
            }
        else:
            client = s3_client(self._endpoint)
            listed = client.list_objects_v2(Bucket=self._bucket).get("Contents", [])
            prefix = self.config["s3"].split("/", 3)[3] + "/"
            assert all(item["Key"].startswith(prefix) for item in listed), listed
            blobs = {
                item["Key"][len(prefix) :]: client.get_object(
                    Bucket=self._bucket, Key=item["Key"]
                )["Body"].read()
                for item in listed
            }
        assert all(re.fullmatch(r"study-\d+/point-\d+\.pkl", name) for name in blobs), blobs
        return {n.split("/")[1]: unpickle_checkpoint(b) for n, b in blobs.items()}


#: What ends every checkpoint: its HMAC-SHA256 (32 bytes), then this mark.
MARK = b"hpo-ckpt-v1\n"


def unpickle_checkpoint(blob: bytes) -> Any:
    """A checkpoint's state, its MAC cut off (the test's own files: not checked here)."""
    assert blob.endswith(MARK), blob[-40:]
    return pickle.loads(blob[: -32 - len(MARK)])  # noqa: S301


def s3_client(endpoint: str | None) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
    )  # fmt: skip


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-compatible server (moto) on a free port, for the whole test session."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"moto_server ended: {log.read_text()[-2000:]}"
            try:
                s3_client(endpoint).list_buckets()
                break
            except Exception:
                assert time.monotonic() < deadline, f"no S3 server: {log.read_text()[-2000:]}"
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(params=["dir", "s3"])
def checkpoint_store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Store:
    """``checkpoints:`` on a fresh directory or a fresh bucket (under a prefix)."""
    if request.param == "dir":
        folder = tmp_path / "ckpt"
        return Store(config={"dir": str(folder)}, _folder=folder)
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"hpo-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)  # for runs inside the test's own process
    # what the workers' operator allows: the service, and the bucket
    allow = {"HPO_S3_ENDPOINTS": endpoint, "HPO_CHECKPOINT_LOCATIONS": f"s3://{bucket}/"}
    for key, value in allow.items():
        monkeypatch.setenv(key, value)
    config = {"s3": f"s3://{bucket}/runs/ckpt", "endpoint_url": endpoint}
    env = {**S3_ENV, **allow}
    return Store(config=config, env=env, _endpoint=endpoint, _bucket=bucket)


class Relay:
    """A TCP relay to ``127.0.0.1:upstream`` that can go away for a while (``outage``): its
    connections are cut and new ones refused, as when a storage service restarts."""

    def __init__(self, upstream: int) -> None:
        self.upstream, self.port = upstream, free_port()
        self._links: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.hanging_up, self.hung_up = False, 0
        self._listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by an outage or close()
            if self.hanging_up:
                self.hung_up += 1
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._links += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _cut(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes the accept() blocked on it
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        self._drop_links()

    def _drop_links(self) -> None:
        with self._lock:
            links, self._links = self._links, []
        for sock in links:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def outage(self, seconds: float) -> None:
        """Go away now, and come back on the same port after ``seconds`` (in the background)."""
        self._cut()
        timer = threading.Timer(seconds, self._listen)
        timer.daemon = True
        timer.start()

    def hang_up(self) -> None:
        """From now on, close every connection as soon as it is made, counting them: each one
        is an attempt of the client's."""
        self.hanging_up = True
        self._drop_links()

    def close(self) -> None:
        self._cut()
