"""Summaries of studies read from the database: what ``hpo-inspect`` prints, as plain data."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo_framework.registry import OPEN, Registry, StudyRecord
from hpo_framework.trial_attrs import cannot_serve, trial_summary

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


def display_state(record: StudyRecord, counts: Counter[str]) -> str:
    """open / done / timeout / stopped / failed, as a person would describe the study."""
    if record.state != OPEN:
        return record.state
    finished = counts["COMPLETE"] + counts["PRUNED"]
    if record.budget is not None and finished >= record.budget:
        return "done"
    if record.timed_out and not counts["RUNNING"]:
        return "timeout"
    return OPEN


def list_studies(storage: optuna.storages.RDBStorage) -> list[dict[str, Any]]:
    """One row per study: state, budget progress, best value, running trials."""
    rows = []
    for record in Registry(storage.engine).all():
        study = optuna.load_study(study_name=record.name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        counts = Counter(t.state.name for t in trials)
        rows.append(
            {
                "study": record.name,
                "state": display_state(record, counts),
                "finished": counts["COMPLETE"] + counts["PRUNED"],
                "budget": record.budget,
                "best": _best_values(study),
                "running": counts["RUNNING"],
                "failed": counts["FAIL"],
            }
        )
    return rows


def summarize(storage: optuna.storages.RDBStorage, name: str, top: int = 10) -> dict[str, Any]:
    """Everything ``hpo-inspect STUDY`` shows, as JSON-ready data."""
    record = Registry(storage.engine).get(name)
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    durations = sorted(
        t.duration.total_seconds()
        for t in trials
        if t.duration is not None and t.state.is_finished()
    )
    workers = Counter(
        str(t.user_attrs.get("worker", "unknown")) for t in trials if t.state != TrialState.WAITING
    )
    errors = [
        {"number": t.number, "error": t.user_attrs.get("error")}
        for t in trials
        if t.state == TrialState.FAIL
    ][-5:]
    return {
        "study": name,
        "directions": [d.name.lower() for d in study.directions],
        "state": display_state(record, counts),
        "budget": record.budget,
        "finished": counts["COMPLETE"] + counts["PRUNED"],
        "counts": {s: counts[s] for s in STATES},
        "best": [_point(t) for t in _best_trials(study)],
        "top": [trial_summary(t) for t in _ranked(study, done)[:top]],
        "trials": [trial_summary(t) for t in trials],
        "workers": dict(workers.most_common()),
        "duration_s": _duration_stats(durations),
        "errors": errors,
        "cannot_serve": cannot_serve(study.user_attrs),
        "study_error": record.error,
        "session": record.session_ref,
        "config_hash": record.config_hash,
        "version": record.version,
    }


def best_summary(study: optuna.Study) -> str:
    """Two lines about the best trial(s), for scripts that ran ``run_hpo``."""
    best = _best_trials(study)
    if not best:
        return "no trial completed"
    lines = []
    for t in best[:5]:
        values = ", ".join(f"{v:.6g}" for v in t.values)
        lines.append(f"best trial {t.number}: value {values} params {t.params}")
    return "\n".join(lines)


def _best_trials(study: optuna.Study) -> list[FrozenTrial]:
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: t.number)
    return [study.best_trial]


def _best_values(study: optuna.Study) -> list[float] | None:
    best = _best_trials(study)
    return list(best[0].values) if len(best) == 1 else None


def _ranked(study: optuna.Study, done: list[FrozenTrial]) -> list[FrozenTrial]:
    if len(study.directions) > 1:
        front = {t.number for t in _best_trials(study)}
        return sorted(done, key=lambda t: (t.number not in front, t.number))
    sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
    return sorted(done, key=lambda t: sign * t.values[0])


def _point(t: FrozenTrial) -> dict[str, Any]:
    return {"number": t.number, "values": t.values, "params": t.params}


def _duration_stats(durations: list[float]) -> dict[str, float | None]:
    if not durations:
        return {"mean": None, "p50": None, "p95": None}
    p95 = durations[min(len(durations) - 1, round(0.95 * (len(durations) - 1)))]
    return {
        "mean": statistics.fmean(durations),
        "p50": statistics.median(durations),
        "p95": p95,
    }
