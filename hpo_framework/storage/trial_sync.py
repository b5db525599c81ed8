"""A study's trials read in one statement (PostgreSQL), for the worker's trial-list sync.

Optuna reads the trials that are new or unfinished since the last sync with one query for
the trials and one for each of its five child tables (parameters, values, user and system
attributes, intermediate values), after a read of the study's row. Here the child rows come
aggregated as JSON arrays beside each trial row, and the study's row is the query's outer
table: one statement, in autocommit, and an unknown study still raises ``KeyError`` as in
Optuna. The trials built are the ones Optuna's ``_build_frozen_trial_from_trial_model`` would
build from the same rows (``tests/pool/test_db_cost.py`` compares the two). Float values travel
as text inside the JSON, exactly: PostgreSQL 12 and later print a ``double precision`` in its
shortest round-trip form, and infinities and NaN are stored by Optuna as NULL with a type.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from optuna import distributions
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

_SYNC = """
SELECT s.study_id, t.trial_id, t.number, t.state, t.datetime_start, t.datetime_complete,
  (SELECT json_agg(json_build_array(p.param_name, p.param_value::text, p.distribution_json)
                   ORDER BY p.param_id)
     FROM trial_params p WHERE p.trial_id = t.trial_id) AS params,
  (SELECT json_agg(json_build_array(v.objective, v.value::text, v.value_type))
     FROM trial_values v WHERE v.trial_id = t.trial_id) AS vals,
  (SELECT json_agg(json_build_array(u.key, u.value_json) ORDER BY u.trial_user_attribute_id)
     FROM trial_user_attributes u WHERE u.trial_id = t.trial_id) AS user_attrs,
  (SELECT json_agg(json_build_array(a.key, a.value_json) ORDER BY a.trial_system_attribute_id)
     FROM trial_system_attributes a WHERE a.trial_id = t.trial_id) AS system_attrs,
  (SELECT json_agg(json_build_array(i.step, i.intermediate_value::text, i.intermediate_value_type)
                   ORDER BY i.step)
     FROM trial_intermediate_values i WHERE i.trial_id = t.trial_id) AS steps
FROM studies s
LEFT JOIN trials t
  ON t.study_id = s.study_id
     AND (t.trial_id > :after OR t.trial_id = ANY(CAST(:ids AS integer[])))
WHERE s.study_id = :study
ORDER BY t.trial_id
"""
_QUERY = sa.text(_SYNC)  # the ids as one array parameter: any number of them, one text
_VALUE = models.TrialValueModel
_STEP = models.TrialIntermediateValueModel


def read_trials(
    engine: sa.Engine, study_id: int, unfinished: set[int], after: int
) -> list[FrozenTrial]:
    """The study's trials numbered past trial id ``after``, and those of ``unfinished``."""
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with autocommit.connect() as conn:
        rows = conn.execute(
            _QUERY, {"study": study_id, "after": after, "ids": sorted(unfinished)}
        ).all()
    if not rows:
        raise KeyError(f"No study with study_id {study_id} exists.")
    return [_trial(row) for row in rows if row.trial_id is not None]


def _float(text: str | None) -> float | None:
    """A ``double precision`` sent as its text, which keeps what JSON numbers lose: that
    ``2`` is a float and ``-0`` has a sign."""
    return None if text is None else float(text)


def _trial(row: Any) -> FrozenTrial:
    values: list[float] | None = None
    if row.vals:
        values = [0.0] * len(row.vals)
        for objective, value, kind in row.vals:
            values[objective] = _VALUE.stored_repr_to_value(
                _float(value), _VALUE.TrialValueType[kind]
            )
    params = [
        (name, value, distributions.json_to_distribution(dist))
        for name, value, dist in row.params or ()
    ]
    return FrozenTrial(
        number=row.number,
        state=row.state if isinstance(row.state, TrialState) else TrialState[row.state],
        value=None,
        values=values,
        datetime_start=row.datetime_start,
        datetime_complete=row.datetime_complete,
        params={name: dist.to_external_repr(float(value)) for name, value, dist in params},
        distributions={name: dist for name, _, dist in params},
        user_attrs={key: json.loads(value) for key, value in row.user_attrs or ()},
        system_attrs={key: json.loads(value) for key, value in row.system_attrs or ()},
        intermediate_values={
            step: _STEP.stored_repr_to_intermediate_value(
                _float(value), _STEP.TrialIntermediateValueType[kind]
            )
            for step, value, kind in row.steps or ()
        },
        trial_id=row.trial_id,
    )
