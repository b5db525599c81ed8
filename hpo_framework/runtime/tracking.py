"""Experiment trackers: each finished trial, with its logged metrics, in MLflow or TensorBoard.

``tracking:`` in config.yaml names them; the worker that finishes a trial sends it, after the
result is saved, from the trial's metric histories (``metrics``):

- **MLflow** (``pip install 'hpo-framework[mlflow]'``): a parent run per study, found or
  created once for all workers (the first to record its id in the study's attribute
  ``hpo:mlflow_parent`` wins), and one child run per trial with its parameters, every logged
  metric with its step and time, the final value(s) as ``value`` (``value_<i>`` for several
  directions), and tags for the worker, the attempt, the state and the study;
- **TensorBoard** (``pip install 'hpo-framework[tensorboard]'``): event files per trial under
  ``<dir>/<study>/trial-<n>``, one scalar series per metric, plus ``value``.

A tracker that fails (unreachable, a missing package, a destination this host's operator did
not allow in ``HPO_TRACKING_URIS``) never fails a trial: the worker says why once per study
and goes on.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from hpo_framework.config.host_policy import tracking_refusal
from hpo_framework.config.schema import TrackingSpec
from hpo_framework.storage import metrics
from hpo_framework.storage.optuna_tables import insert_study_attr_once, study_user_attrs

log = logging.getLogger("hpo.tracking")

MLFLOW_PARENT_ATTR = "hpo:mlflow_parent"


@dataclass(frozen=True)
class FinishedTrial:
    number: int
    trial_id: int
    state: str  # COMPLETE, PRUNED, FAIL
    values: Sequence[float] | None
    params: dict[str, Any]
    attempt: int
    worker: str


class Trackers:
    """The study's trackers in this process; ``send`` never raises."""

    def __init__(self, spec: TrackingSpec, study: str, study_id: int, engine: Engine) -> None:
        self.spec, self.study, self.study_id, self.engine = spec, study, study_id, engine
        self._said: set[str] = set()
        self._mlflow: Any = None  # (client, experiment id, parent run id), once opened

    def send(self, trial: FinishedTrial) -> None:
        history: metrics.History | None = None
        for name, destination, send in (
            ("mlflow", self.spec.mlflow_uri, self._to_mlflow),
            ("tensorboard", self.spec.tensorboard_dir, self._to_tensorboard),
        ):
            if destination is None or name in self._said:
                continue
            refusal = tracking_refusal(destination, directory=name == "tensorboard")
            if refusal:
                self._give_up(name, refusal)
                continue
            try:
                if history is None:
                    history = metrics.of_trial(self.engine, trial.trial_id)
                send(trial, history)
            except ImportError as e:
                self._give_up(name, f"the package {e.name!r} is missing: pip install "
                                    f"'hpo-framework[{name}]'")  # fmt: skip
            except Exception as e:  # noqa: BLE001 - a tracker never fails a trial
                log.warning("study=%s trial %d not sent to %s: %s: %s", self.study,
                            trial.number, name, type(e).__name__, e)  # fmt: skip

    def _give_up(self, name: str, why: str) -> None:
        self._said.add(name)
        log.warning("study=%s: no %s tracking from this process: %s", self.study, name, why)

    # --- MLflow -------------------------------------------------------------------------------

    def _to_mlflow(self, trial: FinishedTrial, history: metrics.History) -> None:
        from mlflow.entities import Metric, Param, RunStatus

        client, experiment_id, parent = self._mlflow_parent()
        tags = {
            "mlflow.parentRunId": parent, "hpo.study": self.study,
            "hpo.trial": str(trial.number), "hpo.worker": trial.worker,
            "hpo.attempt": str(trial.attempt), "hpo.state": trial.state,
        }  # fmt: skip
        run = client.create_run(experiment_id, run_name=f"trial-{trial.number}", tags=tags)
        run_id = run.info.run_id
        now_ms = run.info.start_time
        logged = [
            Metric(name, float(p["value"]), int(p["at"] * 1000), p["step"] or 0)
            for name, points in history.items()
            for p in points
        ]
        for i, value in enumerate(trial.values or ()):
            key = "value" if len(trial.values or ()) == 1 else f"value_{i}"
            logged.append(Metric(key, float(value), now_ms, 0))
        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v)
                  for k, v in trial.params.items()]  # fmt: skip
        for start in range(0, max(len(logged), 1), 1000):  # MLflow's batch limit
            client.log_batch(run_id, metrics=logged[start : start + 1000],
                             params=params if start == 0 else [])  # fmt: skip
        status = {"COMPLETE": RunStatus.FINISHED, "FAIL": RunStatus.FAILED}.get(
            trial.state, RunStatus.KILLED
        )
        client.set_terminated(run_id, RunStatus.to_string(status))

    def _mlflow_parent(self) -> tuple[Any, str, str]:
        if self._mlflow is not None:
            return self._mlflow  # type: ignore[no-any-return]
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # not minutes per trial
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_ALLOW_HTTP_REDIRECTS", "false")  # the allowed URL only
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.spec.mlflow_uri)
        name = self.spec.mlflow_experiment or self.study
        found = client.get_experiment_by_name(name)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(name)
            except Exception:  # another worker created it first
                experiment_id = client.get_experiment_by_name(name).experiment_id  # type: ignore[union-attr]
        parent = self._recorded_parent()
        if parent is None:
            mine = client.create_run(
                experiment_id, run_name=self.study, tags={"hpo.study": self.study}
            ).info.run_id
            parent = self._record_parent(mine)
            if parent != mine:  # another worker's is the study's
                client.delete_run(mine)
        self._mlflow = (client, experiment_id, parent)
        return self._mlflow  # type: ignore[no-any-return]

    def _recorded_parent(self) -> str | None:
        a = study_user_attrs.c
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.select(a.value_json).where(
                    a.study_id == self.study_id, a.key == MLFLOW_PARENT_ATTR
                )
            ).scalar()
        return None if value is None else str(json.loads(value))

    def _record_parent(self, run_id: str) -> str:
        """The study's parent run: ``run_id`` if this process recorded it first."""
        if insert_study_attr_once(self.engine, self.study_id, MLFLOW_PARENT_ATTR, run_id):
            return run_id
        recorded = self._recorded_parent()
        assert recorded is not None
        return recorded

    # --- TensorBoard --------------------------------------------------------------------------

    def _to_tensorboard(self, trial: FinishedTrial, history: metrics.History) -> None:
        from tensorboardX import SummaryWriter

        assert self.spec.tensorboard_dir is not None
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.study)
        if not safe.strip("."):  # a study named ".." stays under the directory
            safe = safe.replace(".", "_")
        folder = Path(os.path.abspath(self.spec.tensorboard_dir)) / safe / f"trial-{trial.number}"
        writer = SummaryWriter(logdir=str(folder))
        try:
            for name, points in history.items():
                for i, p in enumerate(points):
                    step = p["step"] if p["step"] is not None else i
                    writer.add_scalar(name, float(p["value"]), global_step=step,
                                      walltime=p["at"])  # fmt: skip
            for i, value in enumerate(trial.values or ()):
                key = "value" if len(trial.values or ()) == 1 else f"value_{i}"
                writer.add_scalar(key, float(value), global_step=0)
            writer.add_text("params", json.dumps(trial.params, default=str), global_step=0)
        finally:
            writer.close()
