"""Finished trials reach MLflow and TensorBoard, read back with their own readers; a tracker
that fails or is not allowed never fails a trial."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import free_port, start_worker
from tests.pool_helpers import counts, create, trials

STEPS = [0, 1, 2, 3]  # tests.sessions:logs_history logs loss and epoch at these steps


def run_tracked(tmp_path: Path, url: str, tracking: dict, **env: str) -> tuple[str, Path]:
    name = create(
        tmp_path, url, name="tracked", session="tests.sessions:logs_history",
        study_={"n_trials": 3}, tracking=tracking,
    )  # fmt: skip
    log = tmp_path / "worker.log"
    assert start_worker("--idle-exit", "1", url=url, log=log, **env).wait(timeout=180) == 0
    assert counts(url, name)["COMPLETE"] == 3  # whatever the trackers did
    return name, log


def test_mlflow_gets_a_parent_run_and_a_child_run_per_trial(
    tmp_path: Path, sqlite_url: str
) -> None:
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow' / 'runs.db'}"
    (tmp_path / "mlflow").mkdir()
    allow = {"HPO_TRACKING_URIS": store}  # a store URI is allowed as written, exactly
    name, _ = run_tracked(
        tmp_path, sqlite_url, {"mlflow": {"tracking_uri": store, "experiment": "hpo-exp"}},
        **allow,
    )  # fmt: skip
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("hpo-exp")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["hpo.study"] == name
    children = {int(r.data.tags["hpo.trial"]): r for r in runs if r is not parent}
    by_number = {t.number: t for t in trials(sqlite_url, name)}
    assert set(children) == set(by_number) == {0, 1, 2}
    for number, run in children.items():
        t = by_number[number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["hpo.worker"] == t.user_attrs["worker"]
        assert run.data.tags["hpo.attempt"] == "0" and run.info.status == "FINISHED"
        assert float(run.data.params["x"]) == pytest.approx(t.params["x"])
        assert run.data.metrics["value"] == pytest.approx(t.value)
        loss = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in loss] == STEPS
        assert [m.value for m in loss] == pytest.approx(
            [t.params["x"] ** 2 / (s + 1) for s in STEPS]
        )


def test_tensorboard_gets_event_files_per_trial(tmp_path: Path, sqlite_url: str) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "tb"
    name, _ = run_tracked(
        tmp_path, sqlite_url, {"tensorboard": {"dir": str(board)}},
        HPO_TRACKING_URIS=str(tmp_path),
    )  # fmt: skip
    by_number = {t.number: t for t in trials(sqlite_url, name)}
    for number, t in by_number.items():
        events = EventAccumulator(str(board / name / f"trial-{number}"))
        events.Reload()
        loss = events.Scalars("loss")
        assert [e.step for e in loss] == STEPS
        assert [e.value for e in loss] == pytest.approx(
            [t.params["x"] ** 2 / (s + 1) for s in STEPS], rel=1e-6
        )
        assert [e.step for e in events.Scalars("epoch")] == STEPS
        assert events.Scalars("value")[0].value == pytest.approx(t.value, rel=1e-6)


def test_a_failing_or_refused_tracker_never_fails_a_trial(tmp_path: Path, sqlite_url: str) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"  # allowed, but nothing listens
    _, log = run_tracked(
        tmp_path, sqlite_url,
        {"mlflow": {"tracking_uri": nobody}, "tensorboard": {"dir": str(tmp_path / "tb")}},
        HPO_TRACKING_URIS=nobody,
    )  # fmt: skip
    text = log.read_text()
    assert "not sent to mlflow" in text
    refused = [line for line in text.splitlines() if "no tensorboard tracking" in line]
    assert len(refused) == 1 and "is not under one of this host's HPO_TRACKING_URIS" in refused[0]
    assert not (tmp_path / "tb").exists()
