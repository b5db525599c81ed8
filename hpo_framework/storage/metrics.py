"""Metric histories: every value a session logs, with its step and time, kept per trial.

``trial().log(step=3, val_mse=0.12, epoch=3)`` appends one row per metric to hpo's own table
``hpo_metrics`` (indexed by trial; the value's JSON keeps an int an int), in the worker's
process, one transaction a call; the last value of each metric is also a user attribute of the
trial, which optuna-dashboard shows. ``hpo-inspect --trial N`` shows a trial's histories,
``--metrics`` exports them (long form: one row per trial, metric and step), ``--plot`` draws
one curve per metric. They stay after the study, like Optuna's intermediate values.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from hpo_framework.storage.optuna_tables import trials
from hpo_framework.storage.registry import db_now, hpo_metrics

log = logging.getLogger("hpo.metrics")

_warned_missing = False


def append(engine: Engine, trial_id: int, step: int | None, values: Mapping[str, Any]) -> None:
    """One row per metric, in one transaction. A database whose hpo tables predate this
    table (no ``hpo-coordinator create`` since the upgrade) keeps the last values only,
    saying so once."""
    global _warned_missing
    rows = [
        {"trial_id": trial_id, "name": k, "step": step, "value_json": json.dumps(v)}
        for k, v in values.items()
    ]
    try:
        with engine.begin() as conn:
            conn.execute(hpo_metrics.insert().values(logged_at=db_now(engine)), rows)
    except sa.exc.DatabaseError as e:
        if "hpo_metrics" not in str(e):
            raise
        if not _warned_missing:
            _warned_missing = True
            log.warning(
                "no table hpo_metrics in this database yet (run hpo-coordinator create once "
                "with this version): metric histories are not kept, last values are"
            )


History = dict[str, list[dict[str, Any]]]  # metric -> [{"step", "value", "at"}, ...]


def of_trial(engine: Engine, trial_id: int) -> History:
    """One trial's histories, in the order they were logged (one statement)."""
    return _read(engine, hpo_metrics.c.trial_id == trial_id, hpo_metrics.c.trial_id).get(
        trial_id, {}
    )


def of_study(engine: Engine, study_id: int) -> dict[int, History]:
    """{trial number: histories} of every trial of the study that logged (one statement)."""
    t, m = trials.c, hpo_metrics.c
    mine = m.trial_id.in_(sa.select(t.trial_id).where(t.study_id == study_id))
    number = sa.select(t.number).where(t.trial_id == m.trial_id).scalar_subquery()
    return _read(engine, mine, number)


def _read(engine: Engine, where: Any, key: Any) -> dict[int, History]:
    out: dict[int, History] = defaultdict(lambda: defaultdict(list))
    m = hpo_metrics.c
    query = (
        sa.select(key, m.name, m.step, m.value_json, m.logged_at)
        .where(where)
        .order_by(m.trial_id, m.metric_id)
    )
    try:
        with engine.connect() as conn:
            rows = conn.execute(query).all()
    except sa.exc.DatabaseError as e:  # a database from before histories were kept
        if "hpo_metrics" not in str(e):
            raise
        return {}
    for owner, name, step, value, at in rows:
        out[owner][name].append({"step": step, "value": json.loads(value), "at": at})
    return {o: dict(by_name) for o, by_name in out.items()}


def long_rows(by_trial: Mapping[int, History]) -> list[dict[str, Any]]:
    """The long form of ``--metrics``: one row per trial, metric and logged value."""
    return [
        {"trial": number, "metric": name, "step": p["step"], "value": p["value"], "at": p["at"]}
        for number, history in sorted(by_trial.items())
        for name, points in history.items()
        for p in points
    ]
