"""Whoever can write the database cannot make a worker run code or reach the network.

Each test plays that writer for real: it plants pickles in a checkpoint directory and in an S3
bucket, forges a checkpoint's MAC, points a study's stored config at a server of its own, and
points hooks at loopback listeners, one of them redirecting. Nothing runs, nothing is sent,
and the study's trials go on.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from hpo_framework.storage.registry import hpo_studies
from tests.checkpoint_stores import MARK, S3_ENV, s3_client
from tests.conftest import BIN, cli_env, make_config, run_cli, start_worker, write_config
from tests.pool_helpers import counts, create, trials

FULL_RUN = sum(math.sin(0.4 * (epoch + 1)) for epoch in range(20))  # checkpointed at x=0.4


class _Payload:
    """A pickle that, once unpickled, creates a file: what a writer would plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def planted(marker: Path, kind: str) -> bytes:
    """The bytes a writer plants: a bare pickle, one with a forged MAC, or a checkpoint of
    the right shape cut short."""
    body = pickle.dumps(_Payload(marker))
    if kind == "no MAC":
        return body
    if kind == "forged MAC":
        return body + os.urandom(32) + MARK
    assert kind == "truncated"
    return (body + os.urandom(32) + MARK)[:-7]


def checkpointed_study(tmp_path: Path, url: str, checkpoints: dict[str, Any], **env: str) -> str:
    """A one-trial study of ``tests.sessions:checkpointed`` at x=0.4 (point 0 of study 1)."""
    return create(
        tmp_path, url, name="writer", session="tests.sessions:checkpointed",
        enqueue=[{"x": 0.4}], static={"dir": str(tmp_path), "epoch_s": 0},
        study_={"n_trials": 1, "max_retries": 0}, checkpoints=checkpoints,
    )  # fmt: skip


def assert_ran_from_scratch(tmp_path: Path, url: str, name: str, marker: Path) -> None:
    (trial,) = trials(url, name)
    assert trial.state.name == "COMPLETE" and trial.value == pytest.approx(FULL_RUN, abs=1e-12)
    ran = sorted(int(p.name.split("-")[2]) for p in tmp_path.glob("epoch-0-*"))
    assert ran == list(range(20))  # epoch 0 on: nothing was taken from the planted bytes
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["no MAC", "forged MAC", "truncated"])
def test_a_checkpoint_planted_in_the_directory_is_set_aside_unread(
    tmp_path: Path, sqlite_url: str, kind: str
) -> None:
    folder, marker = tmp_path / "ckpt", tmp_path / "code-ran"
    name = checkpointed_study(tmp_path, sqlite_url, {"dir": str(folder)})
    target = folder / "study-1" / "point-0.pkl"
    target.parent.mkdir(parents=True)
    target.write_bytes(bad := planted(marker, kind))
    log = tmp_path / "worker.log"
    assert start_worker("--idle-exit", "1", url=sqlite_url, log=log).wait(timeout=120) == 0
    assert_ran_from_scratch(tmp_path, sqlite_url, name, marker)
    aside = folder / "study-1" / "point-0.pkl.rejected"
    assert aside.read_bytes() == bad  # kept for the operator to look at
    assert f"checkpoint study-1/point-0.pkl in {folder}" in log.read_text()
    assert "set aside as study-1/point-0.pkl.rejected" in log.read_text()


def test_a_checkpoint_of_another_key_is_refused(tmp_path: Path, sqlite_url: str) -> None:
    """A real checkpoint, written by hpo under a key this pool does not hold."""
    folder, marker = tmp_path / "ckpt", tmp_path / "code-ran"
    name = checkpointed_study(tmp_path, sqlite_url, {"dir": str(folder)})
    other_key = {"HPO_CHECKPOINT_KEY": "another-pool-" + uuid.uuid4().hex}
    writer = run_cli(
        "python", "-c",
        "import sys, pickle\n"
        "from hpo_framework.session.reporting import current_info\n"
        "from hpo_framework import checkpoint\n"
        "from tests.faults.test_database_writer import _Payload\n"
        "from pathlib import Path\n"
        f"t = {{'dir': {str(folder)!r}, 's3': None, 'endpoint_url': None, "
        "'id': 'study-1/point-0.pkl'}\n"
        "checkpoint._write(t, 'pickle', lambda f: pickle.dump("
        f"_Payload(Path({str(marker)!r})), f))\n",
        url=sqlite_url, **other_key,
    )  # fmt: skip
    assert writer.returncode == 0, writer.stderr
    log = tmp_path / "worker.log"
    assert start_worker("--idle-exit", "1", url=sqlite_url, log=log).wait(timeout=120) == 0
    assert_ran_from_scratch(tmp_path, sqlite_url, name, marker)
    assert "fails its MAC" in log.read_text()


class _Listener:
    """A TCP port that counts who connects (and hangs up on them)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@pytest.fixture
def listener() -> Iterator[_Listener]:
    listening = _Listener()
    yield listening
    listening.sock.close()


def _rewrite_stored_config(url: str, name: str, change: dict[str, Any]) -> None:
    """What a database writer does: the stored config, changed in place (no hpo command)."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            c = hpo_studies.c
            raw = json.loads(
                conn.execute(sa.select(c.config_json).where(c.study_name == name)).scalar_one()
            )
            raw.update(change)
            stmt = hpo_studies.update().where(c.study_name == name)
            conn.execute(stmt.values(config_json=json.dumps(raw)))
    finally:
        engine.dispose()


def test_an_s3_endpoint_the_host_did_not_allow_is_never_contacted(
    tmp_path: Path, storage_url: str, listener: _Listener
) -> None:
    name = create(tmp_path, storage_url, name="writer", study_={"n_trials": 3})
    _rewrite_stored_config(
        storage_url, name, {"checkpoints": {"s3": "s3://b/p", "endpoint_url": listener.url}}
    )
    log = tmp_path / "worker.log"
    worker = start_worker("--idle-exit", "2", url=storage_url, log=log, **S3_ENV)
    assert worker.wait(timeout=120) == 0
    assert listener.connections == 0
    assert counts(storage_url, name) == {}  # skipped, with the reason where inspect shows it
    shown = run_cli("hpo-inspect", name, "--format", "json", url=storage_url)
    (why,) = json.loads(shown.stdout)["cannot_serve"].values()
    assert f"endpoint '{listener.url}' is not among this host's HPO_S3_ENDPOINTS" in why


def test_a_stored_storage_url_is_never_connected_to(
    tmp_path: Path, storage_url: str, listener: _Listener
) -> None:
    name = create(tmp_path, storage_url, name="writer", study_={"n_trials": 2})
    port = listener.url.rsplit(":", 1)[1]
    _rewrite_stored_config(
        storage_url, name, {"storage": f"postgresql+psycopg2://u@127.0.0.1:{port}/x"}
    )
    assert start_worker("--idle-exit", "1", url=storage_url).wait(timeout=120) == 0
    assert counts(storage_url, name)["COMPLETE"] == 2 and listener.connections == 0


def test_a_pickle_served_by_an_allowed_s3_endpoint_is_set_aside_unread(
    tmp_path: Path, sqlite_url: str, s3_endpoint: str
) -> None:
    """Even an endpoint the operator allowed may hold what someone else put there."""
    marker = tmp_path / "code-ran"
    bucket = f"hpo-{uuid.uuid4().hex[:12]}"
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="p/study-1/point-0.pkl", Body=planted(marker, "no MAC"))
    env = {
        **S3_ENV,
        "HPO_S3_ENDPOINTS": s3_endpoint,
        "HPO_CHECKPOINT_LOCATIONS": f"s3://{bucket}/",
    }
    store = {"s3": f"s3://{bucket}/p", "endpoint_url": s3_endpoint}
    name = run_cli_create(tmp_path, sqlite_url, store, env)
    log = tmp_path / "worker.log"
    assert start_worker("--idle-exit", "1", url=sqlite_url, log=log, **env).wait(timeout=120) == 0
    assert_ran_from_scratch(tmp_path, sqlite_url, name, marker)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["p/study-1/point-0.pkl.rejected"]  # set aside; the finished point's went
    assert "set aside" in log.read_text()


def run_cli_create(
    tmp_path: Path, url: str, checkpoints: dict[str, Any], env: dict[str, str]
) -> str:
    config = make_config(
        session="tests.sessions:checkpointed", enqueue=[{"x": 0.4}],
        static={"dir": str(tmp_path), "epoch_s": 0},
        study_={"name": "writer", "n_trials": 1, "max_retries": 0}, checkpoints=checkpoints,
    )  # fmt: skip
    path = write_config(tmp_path / "c.yaml", config)
    result = run_cli("hpo-coordinator", "create", str(path), url=url, **env)
    assert result.returncode == 0, result.stderr
    return "writer"


def test_create_refuses_an_s3_endpoint_this_host_did_not_allow(tmp_path: Path) -> None:
    config = make_config(checkpoints={"s3": "s3://b/p", "endpoint_url": "http://127.0.0.1:9"})
    path = write_config(tmp_path / "c.yaml", config)
    result = run_cli("hpo-coordinator", "create", str(path), url=f"sqlite:///{tmp_path}/h.db")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert (
        line.startswith(f"Error: {path}: checkpoints.endpoint_url: endpoint ") and "\n" not in line
    )
    assert "set HPO_S3_ENDPOINTS=http://127.0.0.1:9" in line


def test_checkpoint_locations_pin_where_a_worker_reads_and_writes(tmp_path: Path) -> None:
    config = make_config(checkpoints={"dir": str(tmp_path / "elsewhere")})
    path = write_config(tmp_path / "c.yaml", config)
    pinned = {"HPO_CHECKPOINT_LOCATIONS": f"{tmp_path / 'ckpt'},s3://team-bucket/hpo"}
    result = run_cli("hpo-coordinator", "check", str(path), **pinned)
    assert result.returncode != 0
    assert f"checkpoints.dir: '{tmp_path / 'elsewhere'}' is outside this host's " in result.stderr
    config["checkpoints"] = {"dir": str(tmp_path / "ckpt" / "team-a")}
    assert (
        run_cli("hpo-coordinator", "check", str(write_config(path, config)), **pinned).returncode
        == 0
    )


class _Hook(BaseHTTPRequestHandler):
    """Records POSTs; a ``redirect_to`` server answers each with a 302 there."""

    received: list[dict[str, Any]]
    redirect_to: str | None = None

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        if self.redirect_to:
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
        else:
            self.send_response(204)
        self.end_headers()

    do_GET = do_POST  # noqa: N815 - a followed redirect would come as a GET

    def log_message(self, *args: object) -> None:
        pass


def _server(redirect_to: str | None = None) -> tuple[HTTPServer, type[_Hook]]:
    handler = type("Handler", (_Hook,), {"received": [], "redirect_to": redirect_to})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler


def test_hook_urls_go_only_where_the_host_allows_and_redirects_are_not_followed(
    tmp_path: Path, storage_url: str, listener: _Listener
) -> None:
    target, landed = _server()
    redirector, redirected = _server(redirect_to=f"http://127.0.0.1:{target.server_port}/x")
    hook = f"http://127.0.0.1:{redirector.server_port}/hook"
    try:
        refused = create(
            tmp_path,
            storage_url,
            name="refused",
            study_={"n_trials": 2, "on_done": listener.url + "/hook"},
        )
        log = tmp_path / "refused.log"
        assert start_worker("--idle-exit", "1", url=storage_url, log=log).wait(timeout=120) == 0
        assert counts(storage_url, refused)["COMPLETE"] == 2  # the study went on
        assert listener.connections == 0
        said = [line for line in log.read_text().splitlines() if "on_done not run here" in line]
        assert len(said) == 1 and "is not under one of this host's HPO_HOOK_URLS (none)" in said[0]

        name = create(
            tmp_path, storage_url, name="allowed", study_={"n_trials": 2, "on_done": hook}
        )
        log = tmp_path / "allowed.log"
        allow = {"HPO_HOOK_URLS": f"http://127.0.0.1:{redirector.server_port}/"}
        worker = start_worker("--idle-exit", "1", url=storage_url, log=log, **allow)
        assert worker.wait(timeout=120) == 0
    finally:
        redirector.shutdown()
        target.shutdown()
    (event,) = redirected.received
    assert event["study"] == name and event["event"] == "done"
    assert landed.received == []  # the 302 was the answer, not a new address
    assert f"on_done: POST {hook}: 302" in log.read_text()


def test_the_checkpoint_key_file_is_made_once_private_and_shared(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "checkpoint-key"
    code = (
        "from hpo_framework.config.host_policy import checkpoint_key; "
        "print(checkpoint_key().decode())"
    )
    env = {"HPO_CHECKPOINT_KEY_FILE": str(key_file), "HPO_CHECKPOINT_KEY": ""}
    procs = [
        subprocess.Popen(
            [str(BIN / "python"), "-c", code],
            env=cli_env(**env),
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(4)
    ]
    keys = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(keys) == 1 and len(keys.pop()) == 64  # the first process's key is everybody's
    assert key_file.stat().st_mode & 0o777 == 0o600
    short = run_cli("python", "-c", code, HPO_CHECKPOINT_KEY="too-short")
    assert "HPO_CHECKPOINT_KEY holds 9 characters, fewer than 16" in short.stderr


@pytest.mark.parametrize(
    ("check", "env", "refused", "allowed"),
    [
        # an S3 bucket is an address: none by default, only listed prefixes
        ("location", {}, ["s3://attacker/x"], []),
        (
            "location",
            {"HPO_CHECKPOINT_LOCATIONS": "s3://team/hpo"},
            ["s3://team/other", "s3://team/hpo/../x", "s3://teamx/hpo"],
            ["s3://team/hpo/a"],
        ),
        # hook URLs: the prefix, no dot segments or encoded slashes to climb out of it
        (
            "hook",
            {"HPO_HOOK_URLS": "https://hooks.example.com/services/T1/B1"},
            [
                "https://hooks.example.com/services/T1/B1/../../T2/B2",
                "https://hooks.example.com/services/T1/B1/%2e%2e/x",
                "https://hooks.example.com/services/T1/B1%2f..%2fT2",
                "https://x@hooks.example.com/services/T1/B1",
                "http://hooks.example.com/services/T1/B1",
                "https://hooks.example.com.evil.com/services/T1/B1",
            ],
            [
                "https://hooks.example.com/services/T1/B1",
                "https://HOOKS.example.com/services/T1/B1/x",
            ],
        ),
        # MLflow: a store URI exactly as listed (its query or path could point elsewhere)
        (
            "mlflow",
            {"HPO_TRACKING_URIS": "postgresql://m:pw@db:5432/mlflow,sqlite:////data/m.db"},
            [
                "postgresql://m:pw@db:5432/mlflow/?host=evil.com",
                "sqlite:////data/m.db/../../x.db",
                "file:/etc/x",
                "databricks",
                "http://db:5432/mlflow",
            ],
            ["postgresql://m:pw@db:5432/mlflow", "sqlite:////data/m.db"],
        ),
        # TensorBoard: a directory under a listed one, never a URI read as a relative path
        (
            "tensorboard",
            {"HPO_TRACKING_URIS": "/data/tb"},
            ["/data/tb/../x", "/data/tbx", "file:/data/tb/x"],
            ["/data/tb", "/data/tb/a/b"],
        ),
    ],
)
def test_allow_lists_refuse_what_only_looks_allowed(
    monkeypatch: pytest.MonkeyPatch,
    check: str,
    env: dict[str, str],
    refused: list[str],
    allowed: list[str],
) -> None:
    from hpo_framework.config import host_policy

    for key in ("HPO_CHECKPOINT_LOCATIONS", "HPO_HOOK_URLS", "HPO_TRACKING_URIS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    judge = {
        "location": lambda v: host_policy.checkpoint_location_refusal(None, v),
        "hook": host_policy.hook_url_refusal,
        "mlflow": host_policy.tracking_refusal,
        "tensorboard": lambda v: host_policy.tracking_refusal(v, directory=True),
    }[check]
    assert [v for v in refused if judge(v) is None] == []
    assert [v for v in allowed if judge(v) is not None] == []


def test_a_tensorboard_study_named_dot_dot_stays_in_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hpo_framework.config.schema import TrackingSpec
    from hpo_framework.runtime.tracking import FinishedTrial, Trackers

    board = tmp_path / "tb" / "inner"
    monkeypatch.setenv("HPO_TRACKING_URIS", str(board))
    from hpo_framework.storage.database import open_storage
    from hpo_framework.storage.registry import Registry

    engine = open_storage(f"sqlite:///{tmp_path / 'e.db'}", create_schema=True).engine
    Registry(engine).create_table()
    trackers = Trackers(TrackingSpec(tensorboard_dir=str(board)), "..", 1, engine)
    trackers.send(FinishedTrial(0, 1, "COMPLETE", [1.0], {"x": 1}, 0, "w"))
    engine.dispose()
    assert list((tmp_path / "tb").iterdir()) == [board]  # nothing written beside it
    assert (board / "__" / "trial-0").is_dir()
