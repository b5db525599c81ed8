"""A checkpoint is replaced whole or not at all, even when its writer is killed mid-save;
an S3 store rides out a short outage and refuses a missing bucket at once."""

from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from hpo_framework.checkpoint_store import open_store
from tests.checkpoint_stores import S3_ENV, Relay, s3_client
from tests.conftest import ROOT, cli_env
from tests.pool_helpers import wait_until

# Saves 16 MB states in a loop, each one's number in every byte, counting them in a file.
_SAVER = """
import io, pickle, sys
from pathlib import Path
from hpo_framework.checkpoint_store import open_store
store = open_store({"dir": sys.argv[1], "s3": None, "endpoint_url": None})
count = Path(sys.argv[1]) / "saves"
n = 0
while True:
    n += 1
    state = {"n": n, "weights": bytes([n % 256]) * (16 << 20)}
    store.write("study-1/point-0.pkl", io.BytesIO(pickle.dumps(state)))
    count.write_text(str(n))
"""


def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint_whole(tmp_path: Path) -> None:
    saver = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(tmp_path)], cwd=ROOT, env=cli_env(),
        start_new_session=True,
    )  # fmt: skip
    try:
        count, folder = tmp_path / "saves", tmp_path / "study-1"
        wait_until("three saves", lambda: count.exists() and int(count.read_text() or 0) >= 3)
        # A save in progress: its temporary file is there (or, for a store that writes in
        # place, the checkpoint is short). Kill the writer right then.
        full = len(pickle.dumps({"n": 1, "weights": bytes(16 << 20)}))
        wait_until(
            "a save in progress",
            lambda: any(folder.glob("*.tmp-*")) or (folder / "point-0.pkl").stat().st_size < full,
            every=0.001,
        )
        os.killpg(saver.pid, signal.SIGKILL)
    finally:
        if saver.poll() is None:
            saver.kill()
        saver.wait(timeout=30)
    store = open_store({"dir": str(tmp_path), "s3": None, "endpoint_url": None})
    with store.open_reader("study-1/point-0.pkl") as f:
        state = pickle.loads(f.read())  # noqa: S301 (written by this test)
    assert state["n"] >= 3
    assert state["weights"] == bytes([state["n"] % 256]) * (16 << 20)
    # the killed save's temporary file goes with the checkpoint
    assert list((tmp_path / "study-1").glob("*.tmp-*"))
    store.remove("study-1/point-0.pkl")
    assert list((tmp_path / "study-1").iterdir()) == []


def _s3_store(endpoint: str, bucket: str) -> Any:
    return open_store({"dir": None, "s3": f"s3://{bucket}/ckpt", "endpoint_url": endpoint})


def test_an_s3_save_rides_out_a_short_outage_of_the_service(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    bucket = f"hpo-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    relay = Relay(int(s3_endpoint.rsplit(":", 1)[1]))
    try:
        store = _s3_store(relay.url, bucket)
        store.write("ckpt/a.pkl", io.BytesIO(b"before"))
        relay.outage(1.0)  # connections cut and refused for a second, then it is back
        store.write("ckpt/a.pkl", io.BytesIO(b"after"))
    finally:
        relay.close()
    body = s3_client(s3_endpoint).get_object(Bucket=bucket, Key="ckpt/a.pkl")["Body"].read()
    assert body == b"after"


def test_an_s3_save_to_a_missing_bucket_fails_at_once(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    store = _s3_store(s3_endpoint, f"no-such-{uuid.uuid4().hex[:8]}")
    started = time.monotonic()
    with pytest.raises(Exception, match="NoSuchBucket"):
        store.write("ckpt/a.pkl", io.BytesIO(b"state"))
    assert time.monotonic() - started < 10  # not retried like an outage
