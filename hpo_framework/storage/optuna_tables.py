"""Optuna's tables, as the framework reads them (and, to pop a waiting trial atomically with
its ticket or to end a trial in one statement, writes them) directly.

Optuna owns and versions this schema; reading it here replaces several queries through
Optuna's trial cache with one indexed query where the pool asks the same thing every trial.
The tables are declared here, not taken from Optuna's ORM models, so that the read side
(``hpo-inspect``) needs neither Optuna nor SQLAlchemy's ORM; ``tests/unit/test_optuna_tables.py``
compares every column with Optuna's models. Nothing creates tables from these declarations.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    import optuna


class _EnumByName(sa.types.TypeDecorator[str]):
    """One of Optuna's enum columns (``trialstate`` on PostgreSQL, which psycopg 3 needs to
    compare a state with a parameter): binds an enum member (``TrialState.RUNNING``) or its
    name; reads the name, a ``str``."""

    impl = sa.Enum
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        return getattr(value, "name", value)


def _names(type_name: str, *names: str) -> _EnumByName:
    return _EnumByName(*names, name=type_name)


TRIAL_STATES = ("RUNNING", "COMPLETE", "PRUNED", "FAIL", "WAITING")
#: How Optuna stores a float that JSON and SQL cannot hold as a number.
VALUE_TYPES = ("FINITE", "INF_POS", "INF_NEG")
STEP_VALUE_TYPES = ("FINITE", "INF_POS", "INF_NEG", "NAN")

_metadata = sa.MetaData()  # never created from here: Optuna creates and migrates its schema
_key = sa.String(512)  # Optuna's MAX_INDEXED_STRING_LENGTH

studies = sa.Table(
    "studies", _metadata,
    sa.Column("study_id", sa.Integer, primary_key=True),
    sa.Column("study_name", _key, nullable=False),
)  # fmt: skip
study_directions = sa.Table(
    "study_directions", _metadata,
    sa.Column("study_direction_id", sa.Integer, primary_key=True),
    sa.Column("direction", _names("studydirection", "NOT_SET", "MINIMIZE", "MAXIMIZE"),
              nullable=False),
    sa.Column("study_id", sa.Integer, nullable=False),
    sa.Column("objective", sa.Integer, nullable=False),
)  # fmt: skip
study_user_attrs = sa.Table(
    "study_user_attributes", _metadata,
    sa.Column("study_user_attribute_id", sa.Integer, primary_key=True),
    sa.Column("study_id", sa.Integer),
    sa.Column("key", _key),
    sa.Column("value_json", sa.Text),
)  # fmt: skip
trials = sa.Table(
    "trials", _metadata,
    sa.Column("trial_id", sa.Integer, primary_key=True),
    sa.Column("number", sa.Integer),
    sa.Column("study_id", sa.Integer),
    sa.Column("state", _names("trialstate", *TRIAL_STATES), nullable=False),
    sa.Column("datetime_start", sa.DateTime),
    sa.Column("datetime_complete", sa.DateTime),
)  # fmt: skip
trial_params = sa.Table(
    "trial_params", _metadata,
    sa.Column("param_id", sa.Integer, primary_key=True),
    sa.Column("trial_id", sa.Integer),
    sa.Column("param_name", _key),
    sa.Column("param_value", sa.Float(precision=53)),
    sa.Column("distribution_json", sa.Text),
)  # fmt: skip
trial_values = sa.Table(
    "trial_values", _metadata,
    sa.Column("trial_value_id", sa.Integer, primary_key=True),
    sa.Column("trial_id", sa.Integer, nullable=False),
    sa.Column("objective", sa.Integer, nullable=False),
    sa.Column("value", sa.Float(precision=53)),
    sa.Column("value_type", _names("trialvaluetype", *VALUE_TYPES), nullable=False),
)  # fmt: skip
trial_intermediate_values = sa.Table(
    "trial_intermediate_values", _metadata,
    sa.Column("trial_intermediate_value_id", sa.Integer, primary_key=True),
    sa.Column("trial_id", sa.Integer, nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("intermediate_value", sa.Float(precision=53)),
    sa.Column("intermediate_value_type", _names("trialintermediatevaluetype", *STEP_VALUE_TYPES),
              nullable=False),
)  # fmt: skip


def _attrs(name: str, id_column: str) -> sa.Table:
    return sa.Table(
        name, _metadata,
        sa.Column(id_column, sa.Integer, primary_key=True),
        sa.Column("trial_id", sa.Integer),
        sa.Column("key", _key),
        sa.Column("value_json", sa.Text),
    )  # fmt: skip


trial_user_attrs = _attrs("trial_user_attributes", "trial_user_attribute_id")
trial_system_attrs = _attrs("trial_system_attributes", "trial_system_attribute_id")


def has_waiting_trials(storage: optuna.storages.RDBStorage, study_id: int) -> bool:
    """Whether the study has a WAITING trial (an enqueued point or a retry) to pop."""
    query = (
        sa.select(trials.c.trial_id)
        .where(trials.c.study_id == study_id, trials.c.state == "WAITING")
        .limit(1)
    )
    with storage.engine.connect() as conn:
        return conn.execute(query).first() is not None


def trial_with_system_attr(
    bind: sa.Engine | sa.Connection, key: str, value: object, *, running: bool = False
) -> int | None:
    """The id of a trial carrying the system attribute ``key`` = ``value`` (and still
    RUNNING, if ``running``), if any."""
    a = trial_system_attrs.c
    query = sa.select(a.trial_id).where(a.key == key, a.value_json == json.dumps(value))
    if running:
        query = query.join(trials, trials.c.trial_id == a.trial_id).where(
            trials.c.state == "RUNNING"
        )
    query = query.limit(1)
    if isinstance(bind, sa.Connection):
        found = bind.execute(query).scalar()
    else:
        with bind.connect() as conn:
            found = conn.execute(query).scalar()
    return None if found is None else int(found)


def insert_study_attr_once(engine: sa.Engine, study_id: int, key: str, value: object) -> bool:
    """Insert the study's user attribute ``key``; False if some process inserted it first.
    Optuna's unique (study, key) makes this a lock: one winner among all processes."""
    try:
        with engine.begin() as conn:
            conn.execute(
                study_user_attrs.insert().values(
                    study_id=study_id, key=key, value_json=json.dumps(value)
                )
            )
    except sa.exc.IntegrityError:
        return False
    return True
