"""A checkpoint is replaced whole or not at all, even when its writer is killed mid-save;
an S3 store rides out a short outage and refuses a missing bucket at once."""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from hpo_framework import run_hpo
from hpo_framework.config.schema import Config, load_config
from hpo_framework.exceptions import MissingPackageError
from hpo_framework.session.checkpoint_store import open_store
from tests.checkpoint_stores import S3_ENV, Relay, Store, s3_client, unpickle_checkpoint
from tests.conftest import ROOT, cli_env, make_config, write_config
from tests.pool_helpers import wait_until

# Saves 16 MB states in a loop, each one's number in every byte, counting them in a file.
_SAVER = """
import io, pickle, sys
from pathlib import Path
from hpo_framework import run_hpo
from hpo_framework.session.checkpoint_store import open_store
from hpo_framework.config.schema import Config, load_config
from hpo_framework.exceptions import MissingPackageError
store = open_store({"dir": sys.argv[1], "s3": None, "endpoint_url": None})
count = Path(sys.argv[1]) / "saves"
n = 0
while True:
    n += 1
    state = {"n": n, "weights": bytes([n % 256]) * (16 << 20)}
    store.write("study-1/point-0.pkl", io.BytesIO(pickle.dumps(state)))
    count.write_text(str(n))
"""


def _state(pid: int) -> str:
    """A process's state letter (``T``: stopped), from /proc."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint_whole(tmp_path: Path) -> None:
    saver = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(tmp_path)], cwd=ROOT, env=cli_env(),
        start_new_session=True,
    )  # fmt: skip
    try:
        count, folder = tmp_path / "saves", tmp_path / "study-1"
        wait_until("three saves", lambda: count.exists() and int(count.read_text() or 0) >= 3)
        # Freeze the writer until it is caught mid-save (its temporary file there or, for a
        # store that writes in place, the checkpoint short), then kill it right there.
        full = len(pickle.dumps({"n": 1, "weights": bytes(16 << 20)}))

        def caught_mid_save() -> bool:
            os.killpg(saver.pid, signal.SIGSTOP)
            wait_until("the writer to stop", lambda: _state(saver.pid) == "T", every=0.001)
            if any(folder.glob("*.tmp-*")) or (folder / "point-0.pkl").stat().st_size < full:
                return True
            os.killpg(saver.pid, signal.SIGCONT)
            return False

        wait_until("a save in progress", caught_mid_save, every=0.001)
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


def _s3_store(endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("HPO_S3_ENDPOINTS", endpoint)  # what the worker's operator allows
    monkeypatch.setenv("HPO_CHECKPOINT_LOCATIONS", f"s3://{bucket}/")
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
        store = _s3_store(relay.url, bucket, monkeypatch)
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
    store = _s3_store(s3_endpoint, f"no-such-{uuid.uuid4().hex[:8]}", monkeypatch)
    started = time.monotonic()
    with pytest.raises(Exception, match="NoSuchBucket"):
        store.write("ckpt/a.pkl", io.BytesIO(b"state"))
    assert time.monotonic() - started < 10  # not retried like an outage


def test_a_host_without_boto3_reads_an_s3_study_but_neither_creates_nor_serves_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(checkpoints={"s3": "s3://bucket/ckpt"})
    path = write_config(tmp_path / "c.yaml", config)
    monkeypatch.setitem(sys.modules, "boto3", None)  # what import finds on such a host
    with pytest.raises(MissingPackageError) as refused:
        load_config(path)
    assert str(refused.value) == (
        f"{path}: checkpoints.s3: S3 checkpoints need the Python package 'boto3': "
        "pip install 'hpo-framework[s3]'"
    )
    # inspect, set, enqueue and the stale sweep read the stored config on any host...
    assert Config.stored("s", config).checkpoints.s3 == "s3://bucket/ckpt"  # type: ignore[union-attr]
    # ...and a worker that would serve it says why it cannot, here
    with pytest.raises(MissingPackageError):
        Config.stored("s", config, serving=True)


def test_a_relative_dir_is_the_workers_even_when_the_session_changes_directory(
    tmp_path: Path,
) -> None:
    # Relative to where the worker started (the repository, as in every test); the session
    # then moves elsewhere, as Hydra does, and the checkpoints must not follow it.
    relative = f".test-ckpt-{uuid.uuid4().hex[:8]}"
    (tmp_path / "elsewhere").mkdir()
    config = make_config(
        session="tests.sessions:checkpointed",
        static={"dir": str(tmp_path), "epoch_s": 0, "chdir": str(tmp_path / "elsewhere")},
        study_={"n_trials": 2}, checkpoints={"dir": relative, "keep_best": 1},
    )  # fmt: skip
    path = write_config(tmp_path / "c.yaml", config)
    try:
        study = run_hpo("tests.sessions:checkpointed", path, f"sqlite:///{tmp_path / 'r.db'}")
        kept = [p.relative_to(ROOT) for p in (ROOT / relative).rglob("*.pkl")]
    finally:
        shutil.rmtree(ROOT / relative, ignore_errors=True)
    assert kept == [Path(f"{relative}/study-1/point-{study.best_trial.number}.pkl")]
    assert list((tmp_path / "elsewhere").rglob("*")) == []


def test_an_s3_outage_at_clean_up_costs_space_not_the_trial(
    s3_endpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    bucket = f"hpo-{uuid.uuid4().hex[:12]}"
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=bucket)
    relay = Relay(int(s3_endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("HPO_S3_ENDPOINTS", relay.url)
    monkeypatch.setenv("HPO_CHECKPOINT_LOCATIONS", f"s3://{bucket}/")
    config = make_config(
        session="tests.sessions:checkpointed", enqueue=[{"x": 0.3}],
        static={"dir": str(tmp_path), "epoch_s": 0.05, "final_s": 2},
        study_={"n_trials": 1},
        checkpoints={"s3": f"s3://{bucket}/c", "endpoint_url": relay.url},
    )  # fmt: skip

    def cut_after_the_last_save() -> None:  # the session then sleeps 2 s and returns
        # The session's own word that its last save returned (the object being there is not
        # enough: the answer to the PUT may still be on its way through the relay).
        wait_until(
            "the last epoch's save", (tmp_path / "saved-0-19").exists, timeout=120, every=0.05
        )
        listed = client.list_objects_v2(Bucket=bucket)["Contents"]
        body = client.get_object(Bucket=bucket, Key=listed[0]["Key"])["Body"].read()
        assert unpickle_checkpoint(body)["epoch"] == 20
        relay.hang_up()  # gone for good: the worker's clean-up finds nobody

    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("hpo").addHandler(handler)
    cutter = threading.Thread(target=cut_after_the_last_save)
    cutter.start()
    try:
        path = write_config(tmp_path / "c.yaml", config)
        study = run_hpo("tests.sessions:checkpointed", path, f"sqlite:///{tmp_path / 'o.db'}")
    finally:
        cutter.join(timeout=120)
        relay.close()
        logging.getLogger("hpo").removeHandler(handler)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert any("checkpoints not cleaned up" in w for w in warnings), warnings
    # two quick attempts (the HTTP pool may redial a dropped one once), not a session's eight
    assert 2 <= relay.hung_up <= 3
    assert len(client.list_objects_v2(Bucket=bucket)["Contents"]) == 1  # the space it costs


def test_a_save_that_cannot_be_written_fails_the_trial_with_its_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config = make_config(
        session="tests.sessions:checkpointed", static={"dir": str(tmp_path), "epoch_s": 0},
        study_={"n_trials": 1, "max_retries": 0, "max_failed_trials": 1},
        checkpoints={"dir": str(blocker)},
    )  # fmt: skip
    path = write_config(tmp_path / "c.yaml", config)
    study = run_hpo("tests.sessions:checkpointed", path, f"sqlite:///{tmp_path / 'f.db'}")
    (failed,) = study.trials
    assert failed.state.name == "FAIL"
    assert str(blocker) in failed.user_attrs["error"], failed.user_attrs["error"]


def test_a_file_saved_by_the_session_comes_back_to_its_retry(
    tmp_path: Path, checkpoint_store: Store
) -> None:
    config = make_config(
        session="tests.sessions:checkpointed", enqueue=[{"x": 0.4}],
        static={"dir": str(tmp_path), "epoch_s": 0, "as_file": True, "fail_at": 7},
        study_={"n_trials": 1, "max_retries": 1}, checkpoints=checkpoint_store.config,
    )  # fmt: skip
    path = write_config(tmp_path / "c.yaml", config)
    study = run_hpo("tests.sessions:checkpointed", path, f"sqlite:///{tmp_path / 'f.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    retried = sorted(int(p.name.split("-")[2]) for p in tmp_path.glob("epoch-1-*"))
    assert retried == list(range(8, 20))  # from the file saved after epoch 7
    assert study.trials[1].value == pytest.approx(
        sum(math.sin(0.4 * (epoch + 1)) for epoch in range(20)), abs=1e-12
    )


def test_save_file_of_a_missing_file_fails_outside_a_trial_too(tmp_path: Path) -> None:
    from hpo_framework import checkpoint

    with pytest.raises(FileNotFoundError):  # a dry run outside HPO finds the wrong path
        checkpoint.save_file(tmp_path / "model.pt")
    assert checkpoint.load_file(tmp_path / "model.pt") is False
    assert not (tmp_path / "model.pt").exists()
