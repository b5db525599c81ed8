"""Trials and studies read for showing them, without Optuna: what ``hpo-inspect`` reads.

Importing Optuna takes a command-line tool longer than everything else it does, so the read
side takes Optuna's tables directly, as ``trial_sync`` does for the workers, and decodes their
rows as Optuna would (``tests/study/test_trial_reads.py`` compares the two on every value type
and distribution): a parameter's value through its stored distribution, infinities and NaN
through their stored type. A trial's system attributes are Optuna's and hpo's bookkeeping, and
are not read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from hpo_framework.storage.optuna_tables import (
    study_directions,
    study_user_attrs,
    trial_intermediate_values,
    trial_params,
    trial_user_attrs,
    trial_values,
    trials,
)


@dataclass
class TrialRecord:
    """One trial as stored; the fields of Optuna's ``FrozenTrial`` that a summary shows, with
    ``state`` as its name (``"COMPLETE"``)."""

    trial_id: int
    number: int
    state: str
    datetime_start: datetime | None
    datetime_complete: datetime | None
    values: list[float] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    user_attrs: dict[str, Any] = field(default_factory=dict)
    intermediate_values: dict[int, float] = field(default_factory=dict)

    @property
    def duration(self) -> timedelta | None:
        if self.datetime_start is None or self.datetime_complete is None:
            return None
        return self.datetime_complete - self.datetime_start


def read_trials(
    engine: sa.Engine, trial_ids: Iterable[int] | None = None, *, study_id: int | None = None
) -> list[TrialRecord]:
    """Trials ``trial_ids`` in this order, or every trial of ``study_id`` by number: five
    statements (the trials, then one per child table), whatever their number."""
    t = trials.c
    ids: Any
    if trial_ids is not None:
        ids = list(trial_ids)
        if not ids:
            return []
        query = sa.select(trials).where(t.trial_id.in_(ids))
    else:
        ids = sa.select(t.trial_id).where(t.study_id == study_id).scalar_subquery()
        query = sa.select(trials).where(t.study_id == study_id).order_by(t.number)
    p, v, u, i = trial_params.c, trial_values.c, trial_user_attrs.c, trial_intermediate_values.c
    values: dict[int, dict[int, float]] = {}
    with engine.connect() as conn:
        found = {
            row.trial_id: TrialRecord(
                row.trial_id, row.number, row.state, row.datetime_start, row.datetime_complete
            )
            for row in conn.execute(query)
        }
        for trial_id, name, value, dist in conn.execute(
            sa.select(p.trial_id, p.param_name, p.param_value, p.distribution_json)
            .where(p.trial_id.in_(ids)).order_by(p.param_id)
        ):  # fmt: skip
            if trial_id in found:  # (a trial begun since the first statement: not shown)
                found[trial_id].params[name] = external_value(value, dist)
        for trial_id, objective, value, kind in conn.execute(
            sa.select(v.trial_id, v.objective, v.value, v.value_type).where(v.trial_id.in_(ids))
        ):
            values.setdefault(trial_id, {})[objective] = stored_float(value, kind)
        for trial_id, key, value_json in conn.execute(
            sa.select(u.trial_id, u.key, u.value_json)
            .where(u.trial_id.in_(ids)).order_by(u.trial_user_attribute_id)
        ):  # fmt: skip
            if trial_id in found:
                found[trial_id].user_attrs[key] = json.loads(value_json)
        for trial_id, step, value, kind in conn.execute(
            sa.select(i.trial_id, i.step, i.intermediate_value, i.intermediate_value_type)
            .where(i.trial_id.in_(ids)).order_by(i.trial_id, i.step)
        ):  # fmt: skip
            if trial_id in found:
                found[trial_id].intermediate_values[step] = stored_float(value, kind)
    for trial_id, by_objective in values.items():
        if trial_id in found:
            found[trial_id].values = [by_objective[k] for k in sorted(by_objective)]
    if trial_ids is None:
        return list(found.values())
    return [found[x] for x in ids if x in found]


def external_value(internal: float, distribution_json: str) -> Any:
    """A parameter as the session got it, from Optuna's stored float and distribution: an
    int for an int distribution, the choice itself for a categorical one."""
    spec = json.loads(distribution_json)
    kind, attributes = spec["name"], spec["attributes"]
    if kind == "CategoricalDistribution":
        return attributes["choices"][int(internal)]
    if kind.startswith("Int"):  # IntDistribution and the old IntUniform/IntLogUniform
        return int(internal)
    return float(internal)


def stored_float(value: float | None, kind: str) -> float:
    """A value or intermediate value: what Optuna cannot store as a number, by its type."""
    if kind == "FINITE":
        assert value is not None
        return float(value)
    return {"INF_POS": math.inf, "INF_NEG": -math.inf, "NAN": math.nan}[kind]


def directions(engine: sa.Engine, study_id: int) -> list[str]:
    """The study's directions, ``"MINIMIZE"`` or ``"MAXIMIZE"``, by objective."""
    d = study_directions.c
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(d.direction).where(d.study_id == study_id).order_by(d.objective)
            ).scalars()
        )


def study_attrs(engine: sa.Engine, study_id: int) -> dict[str, Any]:
    """The study's user attributes."""
    a = study_user_attrs.c
    with engine.connect() as conn:
        rows = conn.execute(sa.select(a.key, a.value_json).where(a.study_id == study_id)).all()
    return {key: json.loads(value) for key, value in rows}
