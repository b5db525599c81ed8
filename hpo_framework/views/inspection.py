"""Summaries of studies read from the database: what ``hpo-inspect`` prints, as plain data."""

from __future__ import annotations

import functools
import json
import statistics
from collections import Counter
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from hpo_framework.config.param_tree import StoredSpace, merge, unflatten
from hpo_framework.exceptions import HPOError, StudyNotFoundError
from hpo_framework.session.reporting import RESERVED_ATTRS
from hpo_framework.storage import metrics, trial_reads
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
from hpo_framework.storage.trial_reads import TrialRecord

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    #: What the read functions take: an engine (``hpo-inspect``, which imports no Optuna for
    #: a study of one objective) or the Optuna storage a process already has open.
    Database = sa.Engine | optuna.storages.RDBStorage
    Trial = TrialRecord | FrozenTrial


def _engine(db: Database) -> sa.Engine:
    return db if isinstance(db, sa.Engine) else db.engine


@functools.cache
def _optuna_storage(engine: sa.Engine) -> optuna.storages.RDBStorage:
    """An Optuna storage beside ``engine``, for what only Optuna computes (a Pareto front)."""
    from hpo_framework.storage.database import open_storage

    url = engine.url.render_as_string(hide_password=False)
    return open_storage(url, create_schema=False, role="hpo-cli")


def _as_storage(db: Database) -> optuna.storages.RDBStorage:
    return _optuna_storage(db) if isinstance(db, sa.Engine) else db


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


def list_studies(db: Database) -> list[dict[str, Any]]:
    """One row per study: state, budget progress, best value, running trials."""
    engine = _engine(db)
    records = Registry(engine).all()
    t = trials.c
    query = sa.select(t.study_id, t.state, sa.func.count()).group_by(t.study_id, t.state)
    with engine.connect() as conn:
        by_study: dict[int, Counter[str]] = {}
        for study_id, state, n in conn.execute(query):
            by_study.setdefault(study_id, Counter())[state] = n
    rows = []
    for record in records:
        counts = by_study.get(record.study_id, Counter())
        best, _ = _ranked_complete(db, record.study_id, 1)
        rows.append(
            {
                "study": record.name,
                "state": display_state(record, counts),
                "finished": counts["COMPLETE"] + counts["PRUNED"],
                "budget": record.budget,
                "best": list(best[0].values or ()) if len(best) == 1 else None,
                "running": counts["RUNNING"],
                "failed": counts["FAIL"],
            }
        )
    return rows


def summarize(
    db: Database, name: str, top: int = 10, *, all_trials: bool = True
) -> dict[str, Any]:
    """Everything ``hpo-inspect STUDY`` shows, as JSON-ready data.

    Counts, durations, workers and errors are aggregated in the database and only the trials
    shown (best, top, running) are read whole, so a large study costs little to summarize;
    ``all_trials`` adds every trial (for JSON and CSV).
    """
    engine = _engine(db)
    record = Registry(engine).get(name)
    study_id = record.study_id
    t, a = trials.c, trial_user_attrs.c
    mine = t.study_id == study_id
    with engine.connect() as conn:
        counts: Counter[str] = Counter(
            {
                state: n
                for state, n in conn.execute(
                    sa.select(t.state, sa.func.count()).where(mine).group_by(t.state)
                )
            }
        )
        finished = ("COMPLETE", "PRUNED", "FAIL")
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
            .where(mine, a.key == WORKER_ATTR, t.state != "WAITING")
            .group_by(a.value_json)
        ).all()
        error_rows = conn.execute(
            sa.select(t.number, a.value_json)
            .outerjoin(trial_user_attrs, sa.and_(a.trial_id == t.trial_id, a.key == ERROR_ATTR))
            .where(mine, t.state == "FAIL")
            .order_by(t.number.desc())
            .limit(5)
        ).all()
        started = conn.execute(sa.select(sa.func.min(t.datetime_start)).where(mine)).scalar()
        running_ids = list(
            conn.execute(
                sa.select(t.trial_id).where(mine, t.state == "RUNNING").order_by(t.number)
            ).scalars()
        )
    running = trial_reads.read_trials(engine, running_ids)
    workers: Counter[str] = Counter({str(json.loads(v)): n for v, n in worker_rows})
    unknown = sum(counts.values()) - counts["WAITING"] - sum(workers.values())
    if unknown > 0:
        workers["unknown"] += unknown
    best, ranked = _ranked_complete(db, study_id, top)
    space = StoredSpace(record.config)
    study_attrs = trial_reads.study_attrs(engine, study_id)
    summary = {
        "study": name,
        "directions": [d.lower() for d in trial_reads.directions(engine, study_id)],
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
        every = trial_reads.read_trials(engine, study_id=study_id)
        summary["trials"] = [trial_summary(x) for x in every]
    return summary


def _last_step(t: Trial) -> dict[str, Any]:
    """A running trial's last reported step and value (``report``), if any."""
    if not t.intermediate_values:
        return {"last_step": None, "last_value": None}
    step = max(t.intermediate_values)
    return {"last_step": step, "last_value": t.intermediate_values[step]}


def _ranked_complete(db: Database, study_id: int, n: int) -> tuple[list[Trial], list[Trial]]:
    """The best trials (one, or the Pareto front by number) and the first ``n`` complete
    trials ranked: by value (ties by number), or the front first. Several objectives are
    ranked by Optuna, which reads every trial; one is ranked in the database."""
    engine = _engine(db)
    directions = trial_reads.directions(engine, study_id)
    if len(directions) > 1:
        return _ranked_by_optuna(_as_storage(db), study_id, n)
    t, v = trials.c, trial_values.c
    # Best first: -inf, the finite values, +inf when minimizing; the reverse when maximizing.
    kind = sa.case((v.value_type == "INF_NEG", 0), (v.value_type == "FINITE", 1), else_=2)
    order = [kind, v.value] if directions == ["MINIMIZE"] else [kind.desc(), v.value.desc()]
    query = (
        sa.select(t.trial_id)
        .join(trial_values, sa.and_(v.trial_id == t.trial_id, v.objective == 0))
        .where(t.study_id == study_id, t.state == "COMPLETE")
        .order_by(*order, t.number)
        .limit(max(n, 1))
    )
    with engine.connect() as conn:
        ids = list(conn.execute(query).scalars())
    ranked: list[Trial] = list(trial_reads.read_trials(engine, ids))
    return ranked[:1], ranked[:n]


def _ranked_by_optuna(
    storage: optuna.storages.RDBStorage, study_id: int, n: int
) -> tuple[list[Trial], list[Trial]]:
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=storage.get_study_name_from_id(study_id), storage=storage)
    if not any(x.state == TrialState.COMPLETE for x in study.get_trials(deepcopy=False)):
        return [], []
    front: list[Trial] = sorted(study.best_trials, key=lambda x: x.number)
    numbers = {x.number for x in front}
    rest = [
        x for x in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if x.number not in numbers
    ]  # fmt: skip
    return front, (front + rest)[:n]


def _point(t: Trial, space: StoredSpace) -> dict[str, Any]:
    """A best trial: ``params`` under Optuna's flat names (``model.hidden``), and
    ``params_nested`` as the session's ``cfg`` nests them (``{"model": {"hidden": ...}}``,
    list-valued choices as lists)."""
    nested = unflatten(space.decode(t.params))
    return {"number": t.number, "values": t.values, "params": t.params, "params_nested": nested}


def _duration_stats(durations: list[float]) -> dict[str, float | None]:
    if not durations:
        return {"mean": None, "p50": None, "p95": None}
    p95 = durations[min(len(durations) - 1, round(0.95 * (len(durations) - 1)))]
    return {
        "mean": statistics.fmean(durations),
        "p50": statistics.median(durations),
        "p95": p95,
    }


def worker_status(db: Database) -> list[dict[str, Any]]:
    """Every registered worker (``presence``): live or lost, when last seen, what it runs
    (from its tickets) and the studies it skips on its host, with why."""
    engine = _engine(db)
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


def trial_detail(db: Database, name: str, number: int) -> dict[str, Any]:
    """One trial in full (``hpo-inspect NAME --trial N``): its ``cfg`` as the session got it,
    values, intermediate values, the session's own attributes, its attempts and its error."""
    engine = _engine(db)
    record = Registry(engine).get(name)
    t = trials.c
    with engine.connect() as conn:
        trial_id = conn.execute(
            sa.select(t.trial_id).where(t.study_id == record.study_id, t.number == number)
        ).scalar()
    found = trial_reads.read_trials(engine, [] if trial_id is None else [int(trial_id)])
    if not found:
        raise StudyNotFoundError(f"study {name!r} has no trial {number}")
    trial = found[0]
    attrs = trial.user_attrs
    root = attrs.get(RETRY_OF_ATTR, trial.number)
    space = StoredSpace(record.config)
    cfg, asked = _cfg_of(space, trial.params)
    return {
        **trial_summary(trial),
        "params_nested": unflatten(space.decode(trial.params)),
        "cfg": cfg,
        "asked": asked,
        "intermediate_values": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
        "attempt": attrs.get(ATTEMPT_ATTR, 0),
        "attempts": _attempts(engine, record.study_id, root),
        "copied_from": attrs.get(COPIED_FROM_ATTR),
        "traceback": attrs.get(TRACEBACK_ATTR),
        "completed": trial.datetime_complete,
        "attributes": {k: v for k, v in attrs.items() if k not in RESERVED_ATTRS},
        "metrics": metrics.of_trial(engine, trial.trial_id),
    }


def _attempts(engine: sa.Engine, study_id: int, root: Any) -> list[Any]:
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
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        {"number": n, "state": state, "error": None if e is None else json.loads(e)}
        for n, state, e in rows
    ]


def _cfg_of(space: StoredSpace, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``cfg`` a trial's session received (static and ``search_space:`` values, nested),
    and the parameters the session asked for itself (``trial().suggest_*``), not in it."""
    searched = space.decode({k: v for k, v in params.items() if k in space})
    asked = {k: v for k, v in params.items() if k not in space}
    return merge(space.static, unflatten(searched)), asked


def metric_histories(db: Database, name: str) -> dict[int, Any]:
    """{trial number: {metric: [{"step", "value", "at"}, ...]}} of the study's trials."""
    engine = _engine(db)
    return metrics.of_study(engine, Registry(engine).get(name).study_id)


def best_config(db: Database, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The complete ``cfg`` (static and searched values, nested) of the study's best trial:
    what to train the final model with; and the values its session asked for itself."""
    engine = _engine(db)
    record = Registry(engine).get(name)
    if len(trial_reads.directions(engine, record.study_id)) > 1:
        raise HPOError(
            f"study {name!r} has several directions and no single best trial; "
            "hpo-inspect NAME --trial N --format json shows any trial's cfg"
        )
    best, _ = _ranked_complete(engine, record.study_id, 1)
    if not best:
        raise HPOError(f"study {name!r} has no completed trial yet")
    return _cfg_of(StoredSpace(record.config), best[0].params)
