"""Summaries of studies read from the database: what ``hpo-inspect`` prints, as plain data."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from typing import Any

import optuna
import sqlalchemy as sa
import sqlalchemy.orm
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

from hpo_framework.config.schema import Config
from hpo_framework.exceptions import HPOError, StudyNotFoundError
from hpo_framework.param_sampler import SearchSpace, merge, unflatten
from hpo_framework.session.reporting import RESERVED_ATTRS
from hpo_framework.storage import metrics
from hpo_framework.storage.optuna_tables import (
    studies,
    study_user_attrs,
    trial_user_attrs,
    trial_values,
    trials,
)
from hpo_framework.storage.presence import LOST_AFTER_S
from hpo_framework.storage.registry import (
    OPEN,
    Registry,
    StudyRecord,
    db_now,
    hpo_studies,
    hpo_tickets,
    hpo_workers,
)
from hpo_framework.storage.trial_attrs import (
    ATTEMPT_ATTR,
    CANNOT_SERVE_PREFIX,
    COPIED_FROM_ATTR,
    ERROR_ATTR,
    REOPENED_ATTR,
    RETRY_OF_ATTR,
    TRACEBACK_ATTR,
    WORKER_ATTR,
    cannot_serve,
    trial_summary,
)

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


def display_state(record: StudyRecord, counts: Counter[str]) -> str:
    """open / done / timeout / stopped / failed, as a person would describe the study."""
    if record.state != OPEN:
        return record.state.value
    finished = counts["COMPLETE"] + counts["PRUNED"]
    if record.budget is not None and finished >= record.budget:
        return "done"
    if record.timed_out and not counts["RUNNING"]:
        return "timeout"
    return OPEN.value


def list_studies(storage: optuna.storages.RDBStorage) -> list[dict[str, Any]]:
    """One row per study: state, budget progress, best value, running trials."""
    records = Registry(storage.engine).all()
    t = trials.c
    query = sa.select(t.study_id, t.state, sa.func.count()).group_by(t.study_id, t.state)
    with storage.engine.connect() as conn:
        by_study: dict[int, Counter[str]] = {}
        for study_id, state, n in conn.execute(query):
            by_study.setdefault(study_id, Counter())[_name(state)] = n
    rows = []
    for record in records:
        counts = by_study.get(record.study_id, Counter())
        directions = storage.get_study_directions(record.study_id)
        best, _ = _ranked_complete(storage, record.study_id, directions, 1)
        rows.append(
            {
                "study": record.name,
                "state": display_state(record, counts),
                "finished": counts["COMPLETE"] + counts["PRUNED"],
                "budget": record.budget,
                "best": list(best[0].values) if len(best) == 1 else None,
                "running": counts["RUNNING"],
                "failed": counts["FAIL"],
            }
        )
    return rows


def summarize(
    storage: optuna.storages.RDBStorage, name: str, top: int = 10, *, all_trials: bool = True
) -> dict[str, Any]:
    """Everything ``hpo-inspect STUDY`` shows, as JSON-ready data.

    Counts, durations, workers and errors are aggregated in the database and only the trials
    shown (best, top, running) are read whole, so a large study costs little to summarize;
    ``all_trials`` adds every trial (for JSON and CSV).
    """
    record = Registry(storage.engine).get(name)
    study_id = record.study_id
    directions = storage.get_study_directions(study_id)
    t, a = trials.c, trial_user_attrs.c
    mine = t.study_id == study_id
    with storage.engine.connect() as conn:
        counts: Counter[str] = Counter(
            {
                _name(state): n
                for state, n in conn.execute(
                    sa.select(t.state, sa.func.count()).where(mine).group_by(t.state)
                )
            }
        )
        finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        durations = sorted(
            (end - start).total_seconds()
            for start, end in conn.execute(
                sa.select(t.datetime_start, t.datetime_complete).where(
                    mine,
                    t.state.in_(finished),
                    t.datetime_start.is_not(None),
                    t.datetime_complete.is_not(None),
                )  # fmt: skip
            )
        )
        worker_rows = conn.execute(
            sa.select(a.value_json, sa.func.count())
            .join(trials, t.trial_id == a.trial_id)
            .where(mine, a.key == WORKER_ATTR, t.state != TrialState.WAITING)
            .group_by(a.value_json)
        ).all()
        error_rows = conn.execute(
            sa.select(t.number, a.value_json)
            .outerjoin(trial_user_attrs, sa.and_(a.trial_id == t.trial_id, a.key == ERROR_ATTR))
            .where(mine, t.state == TrialState.FAIL)
            .order_by(t.number.desc())
            .limit(5)
        ).all()
        started = conn.execute(sa.select(sa.func.min(t.datetime_start)).where(mine)).scalar()
        running_ids = list(
            conn.execute(
                sa.select(t.trial_id).where(mine, t.state == TrialState.RUNNING).order_by(t.number)
            ).scalars()
        )
    running = read_trials(storage, running_ids)
    workers: Counter[str] = Counter({str(json.loads(v)): n for v, n in worker_rows})
    unknown = sum(counts.values()) - counts["WAITING"] - sum(workers.values())
    if unknown > 0:
        workers["unknown"] += unknown
    best, ranked = _ranked_complete(storage, study_id, directions, top)
    space = _space_of(name, record) if best else None
    study_attrs = storage.get_study_user_attrs(study_id)
    summary = {
        "study": name,
        "directions": [d.name.lower() for d in directions],
        "state": display_state(record, counts),
        "budget": record.budget,
        "finished": counts["COMPLETE"] + counts["PRUNED"],
        "counts": {s: counts[s] for s in STATES},
        "best": [_point(b, space) for b in best],
        "top": [trial_summary(r) for r in ranked[:top]],
        "running": [{**trial_summary(r), **_last_step(r)} for r in running],
        "started": started,  # the study's first trial, naive UTC (Optuna's clock)
        "workers": dict(workers.most_common()),
        "duration_s": _duration_stats(durations),
        "errors": [
            {"number": n, "error": None if v is None else json.loads(v)}
            for n, v in reversed(error_rows)
        ],
        "cannot_serve": cannot_serve(study_attrs),
        "reopened": study_attrs.get(REOPENED_ATTR, []),
        "study_error": record.error,
        "session": record.session_ref,
        "config_hash": record.config_hash,
        "version": record.version,
    }
    if all_trials:
        study = optuna.load_study(study_name=name, storage=storage)
        summary["trials"] = [trial_summary(x) for x in study.get_trials(deepcopy=False)]
    return summary


def _last_step(t: FrozenTrial) -> dict[str, Any]:
    """A running trial's last reported step and value (``report``), if any."""
    if not t.intermediate_values:
        return {"last_step": None, "last_value": None}
    step = max(t.intermediate_values)
    return {"last_step": step, "last_value": t.intermediate_values[step]}


def _name(state: Any) -> str:
    return state.name if isinstance(state, TrialState) else str(state)


def _ranked_complete(
    storage: optuna.storages.RDBStorage, study_id: int, directions: list[Any], n: int
) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
    """The best trials (one, or the Pareto front by number) and the first ``n`` complete
    trials ranked: by value (ties by number), or the front first. Several objectives are
    ranked by Optuna, which reads every trial; one is ranked in the database."""
    if len(directions) > 1:
        study = optuna.load_study(
            study_name=storage.get_study_name_from_id(study_id), storage=storage
        )
        if not any(x.state == TrialState.COMPLETE for x in study.get_trials(deepcopy=False)):
            return [], []
        front = sorted(study.best_trials, key=lambda x: x.number)
        numbers = {x.number for x in front}
        rest = [
            x for x in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if x.number not in numbers
        ]  # fmt: skip
        return front, (front + rest)[:n]
    t, v = trials.c, trial_values.c
    # Best first: -inf, the finite values, +inf when minimizing; the reverse when maximizing.
    minimize = directions[0] == optuna.study.StudyDirection.MINIMIZE
    kind = sa.case(
        (v.value_type == models.TrialValueModel.TrialValueType.INF_NEG, 0),
        (v.value_type == models.TrialValueModel.TrialValueType.FINITE, 1),
        else_=2,
    )
    order = [kind, v.value] if minimize else [kind.desc(), v.value.desc()]
    query = (
        sa.select(t.trial_id)
        .join(trial_values, sa.and_(v.trial_id == t.trial_id, v.objective == 0))
        .where(t.study_id == study_id, t.state == TrialState.COMPLETE)
        .order_by(*order, t.number)
        .limit(max(n, 1))
    )
    with storage.engine.connect() as conn:
        ids = list(conn.execute(query).scalars())
    ranked = read_trials(storage, ids)
    return ranked[:1], ranked[:n]


def read_trials(storage: optuna.storages.RDBStorage, trial_ids: list[int]) -> list[FrozenTrial]:
    """These trials in full, in this order, with one query per Optuna table whatever their
    number (``storage.get_trial`` takes six statements a trial)."""
    if not trial_ids:
        return []
    query = (
        sa.select(models.TrialModel)
        .where(models.TrialModel.trial_id.in_(trial_ids))
        .options(
            sa.orm.selectinload(models.TrialModel.params),
            sa.orm.selectinload(models.TrialModel.values),
            sa.orm.selectinload(models.TrialModel.user_attributes),
            sa.orm.selectinload(models.TrialModel.system_attributes),
            sa.orm.selectinload(models.TrialModel.intermediate_values),
        )
    )
    with sa.orm.Session(storage.engine) as session:
        by_id: dict[int, FrozenTrial] = {
            int(row.trial_id): storage._build_frozen_trial_from_trial_model(row)
            for row in session.scalars(query)
        }
    return [by_id[i] for i in trial_ids if i in by_id]


def _point(t: FrozenTrial, space: SearchSpace | None) -> dict[str, Any]:
    """A best trial: ``params`` under Optuna's flat names (``model.hidden``), and
    ``params_nested`` as the session's ``cfg`` nests them (``{"model": {"hidden": ...}}``,
    list-valued choices as lists)."""
    nested = unflatten(t.params if space is None else space.decode(t.params))
    return {"number": t.number, "values": t.values, "params": t.params, "params_nested": nested}


def _space_of(name: str, record: StudyRecord) -> SearchSpace | None:
    """The study's search space, or None for a stored config this version cannot read."""
    try:
        return Config.stored(name, record.config).search_space
    except HPOError:
        return None


def _duration_stats(durations: list[float]) -> dict[str, float | None]:
    if not durations:
        return {"mean": None, "p50": None, "p95": None}
    p95 = durations[min(len(durations) - 1, round(0.95 * (len(durations) - 1)))]
    return {
        "mean": statistics.fmean(durations),
        "p50": statistics.median(durations),
        "p95": p95,
    }


def worker_status(storage: optuna.storages.RDBStorage) -> list[dict[str, Any]]:
    """Every registered worker (``presence``): live or lost, when last seen, what it runs
    (from its tickets) and the studies it skips on its host, with why."""
    engine = storage.engine
    now = db_now(engine)
    w, k, h = hpo_workers.c, hpo_tickets.c, hpo_studies.c
    with engine.connect() as conn:
        try:
            rows = conn.execute(
                sa.select(hpo_workers, (now - w.seen_at).label("ago")).order_by(w.worker)
            ).all()
        except sa.exc.SQLAlchemyError:  # a schema from before hpo_workers: nobody registered
            return []
        running = conn.execute(
            sa.select(k.worker, h.study_name, trials.c.number)
            .join(hpo_studies, h.study_id == k.study_id)
            .outerjoin(trials, trials.c.trial_id == k.trial_id)
            .order_by(k.ticket_id)
        ).all()
        a = study_user_attrs.c
        skipped = conn.execute(
            sa.select(a.key, a.value_json, studies.c.study_name)
            .join(studies, studies.c.study_id == a.study_id)
            .where(a.key.startswith(CANNOT_SERVE_PREFIX))
        ).all()
    doing: dict[str, list[str]] = {}
    for worker, study, number in running:
        doing.setdefault(worker, []).append(f"{study}#{'-' if number is None else number}")
    skips: dict[str, dict[str, str]] = {}
    for key, value, study in skipped:
        skips.setdefault(key[len(CANNOT_SERVE_PREFIX) :], {})[study] = str(json.loads(value))
    return [
        {
            "worker": r.worker,
            "host": r.host,
            "pid": r.pid,
            "version": r.version,
            "gpus": r.gpus,
            "serves": r.serves,
            "state": "lost" if r.ago > LOST_AFTER_S else "live",
            "seen_s_ago": round(max(0.0, float(r.ago)), 1),
            "running": doing.get(r.worker, []),
            "cannot_serve": skips.get(r.worker, {}),
        }  # fmt: skip
        for r in rows
    ]


def trial_detail(storage: optuna.storages.RDBStorage, name: str, number: int) -> dict[str, Any]:
    """One trial in full (``hpo-inspect NAME --trial N``): its ``cfg`` as the session got it,
    values, intermediate values, the session's own attributes, its attempts and its error."""
    record = Registry(storage.engine).get(name)
    t = trials.c
    with storage.engine.connect() as conn:
        trial_id = conn.execute(
            sa.select(t.trial_id).where(t.study_id == record.study_id, t.number == number)
        ).scalar()
    if trial_id is None:
        raise StudyNotFoundError(f"study {name!r} has no trial {number}")
    trial = storage.get_trial(int(trial_id))
    attrs = dict(trial.user_attrs)
    root = attrs.get(RETRY_OF_ATTR, trial.number)
    attempts = _attempts(storage, record.study_id, root)
    config = Config.stored(name, record.config)
    cfg, asked = _cfg_of(config, trial.params)
    return {
        **trial_summary(trial),
        "params_nested": unflatten(config.search_space.decode(trial.params)),
        "cfg": cfg,
        "asked": asked,
        "intermediate_values": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
        "attempt": attrs.get(ATTEMPT_ATTR, 0),
        "attempts": attempts,
        "copied_from": attrs.get(COPIED_FROM_ATTR),
        "traceback": attrs.get(TRACEBACK_ATTR),
        "completed": trial.datetime_complete,
        "attributes": {k: v for k, v in attrs.items() if k not in RESERVED_ATTRS},
        "metrics": metrics.of_trial(storage.engine, int(trial_id)),
    }


def _attempts(storage: optuna.storages.RDBStorage, study_id: int, root: Any) -> list[Any]:
    """Trial ``root`` and its retries (``retry_of: root``), each with its state and error:
    one query, whatever the study's size."""
    t, a = trials.c, trial_user_attrs.c
    error = trial_user_attrs.alias("error")
    of_study = trials.alias("of_study")
    retries = (
        sa.select(a.trial_id)
        .join(of_study, of_study.c.trial_id == a.trial_id)
        .where(
            of_study.c.study_id == study_id,
            a.key == RETRY_OF_ATTR,
            a.value_json == json.dumps(root),
        )
    )
    query = (
        sa.select(t.number, t.state, error.c.value_json)
        .outerjoin(error, sa.and_(error.c.trial_id == t.trial_id, error.c.key == ERROR_ATTR))
        .where(t.study_id == study_id, sa.or_(t.number == root, t.trial_id.in_(retries)))
        .order_by(t.number)
    )
    with storage.engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        {"number": n, "state": _name(state), "error": None if e is None else json.loads(e)}
        for n, state, e in rows
    ]


def _cfg_of(config: Config, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``cfg`` a trial's session received (static and ``search_space:`` values, nested),
    and the parameters the session asked for itself (``trial().suggest_*``), not in it."""
    searched = config.search_space.decode(
        {k: v for k, v in params.items() if k in config.search_space}
    )
    asked = {k: v for k, v in params.items() if k not in config.search_space}
    return merge(config.static, unflatten(searched)), asked


def metric_histories(storage: optuna.storages.RDBStorage, name: str) -> dict[int, Any]:
    """{trial number: {metric: [{"step", "value", "at"}, ...]}} of the study's trials."""
    return metrics.of_study(storage.engine, Registry(storage.engine).get(name).study_id)


def best_config(
    storage: optuna.storages.RDBStorage, name: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The complete ``cfg`` (static and searched values, nested) of the study's best trial:
    what to train the final model with; and the values its session asked for itself."""
    record = Registry(storage.engine).get(name)
    directions = storage.get_study_directions(record.study_id)
    if len(directions) > 1:
        raise HPOError(
            f"study {name!r} has several directions and no single best trial; "
            "hpo-inspect NAME --trial N --format json shows any trial's cfg"
        )
    best, _ = _ranked_complete(storage, record.study_id, directions, 1)
    if not best:
        raise HPOError(f"study {name!r} has no completed trial yet")
    return _cfg_of(Config.stored(name, record.config), best[0].params)
