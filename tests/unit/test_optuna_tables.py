"""hpo's declarations of Optuna's tables match Optuna's own models, column by column."""

from __future__ import annotations

import sqlalchemy as sa
from optuna.storages._rdb import models

from hpo_framework.storage import optuna_tables

OURS = {
    "studies": optuna_tables.studies,
    "study_directions": optuna_tables.study_directions,
    "study_user_attributes": optuna_tables.study_user_attrs,
    "trials": optuna_tables.trials,
    "trial_params": optuna_tables.trial_params,
    "trial_values": optuna_tables.trial_values,
    "trial_intermediate_values": optuna_tables.trial_intermediate_values,
    "trial_user_attributes": optuna_tables.trial_user_attrs,
    "trial_system_attributes": optuna_tables.trial_system_attrs,
}


def _kind(column: sa.Column) -> tuple[object, ...]:  # type: ignore[type-arg]
    t = column.type
    if isinstance(t, sa.types.TypeDecorator):
        t = t.impl_instance
    if isinstance(t, sa.Enum):
        return ("enum", t.name, tuple(t.enums))
    if isinstance(t, sa.Text):
        return (sa.Text,)
    if isinstance(t, sa.String):
        return (sa.String, t.length)
    if isinstance(t, sa.Float):
        return (sa.Float, t.precision)
    return (type(t),)


def test_every_declared_column_is_optunas_with_its_type_and_nullability() -> None:
    theirs = {m.__tablename__: m.__table__ for m in models.BaseModel.__subclasses__()}
    for name, table in OURS.items():
        assert table.name == name
        for column in table.columns:
            optuna_column = theirs[name].columns[column.name]
            assert _kind(column) == _kind(optuna_column), (name, column.name)
            assert column.nullable == optuna_column.nullable, (name, column.name)
            assert column.primary_key == optuna_column.primary_key, (name, column.name)


def test_enum_columns_take_optunas_members_or_names_and_read_names() -> None:
    from optuna.trial import TrialState

    state = optuna_tables.trials.c.state.type
    dialect = sa.create_engine("sqlite://").dialect
    assert state.process_bind_param(TrialState.WAITING, dialect) == "WAITING"
    assert state.process_bind_param("WAITING", dialect) == "WAITING"
    assert tuple(optuna_tables.TRIAL_STATES) == tuple(s.name for s in TrialState)
