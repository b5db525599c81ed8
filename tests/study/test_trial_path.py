"""The unit tier of the trial path, fast and without PostgreSQL: the executor protocol across a
real process boundary, the settle function on a real SQLite file, and where a worker draws the
line between a study invalid everywhere and one its host cannot serve."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial

from hpo_framework.config.schema import Config
from hpo_framework.exceptions import SessionError, TrialLost, TrialPruned
from hpo_framework.operations.coordinator import create_study
from hpo_framework.runtime.executor import InProcessExecutor, ProcessExecutor
from hpo_framework.runtime.serving import CannotServeHere, InvalidStudy, load_for_serving
from hpo_framework.runtime.settle import settle_failure
from hpo_framework.runtime.trials import StudyHandle, open_study
from hpo_framework.storage.backend import Backend
from hpo_framework.storage.database import open_storage
from hpo_framework.storage.registry import Registry
from tests import sessions
from tests.conftest import make_config


class Link:
    """Answers ``report`` like the supervisor would: prune or lose the trial at a step."""

    info = {"study": "s", "number": 7, "attempt": 1, "worker": "host:1"}

    def __init__(self, prune_at: int | None = None, lost_at: int | None = None) -> None:
        self.steps: list[tuple[int, float]] = []
        self.attrs: dict[str, object] = {}
        self.logged: list[tuple[int | None, dict[str, float]]] = []
        self.prune_at, self.lost_at = prune_at, lost_at

    def set_attr(self, key: str, value: object) -> None:
        self.attrs[key] = value

    def log(self, step: int | None, metrics: dict[str, float]) -> None:
        self.logged.append((step, dict(metrics)))
        self.attrs.update(metrics)  # the last values, as the worker's link keeps them

    def report(self, value: float, step: int) -> None:
        self.steps.append((step, value))
        if step == self.prune_at:
            raise TrialPruned(f"pruned at step {step}")
        if step == self.lost_at:
            raise TrialLost("failed by another worker")


@pytest.fixture(scope="module")
def executor() -> Iterator[ProcessExecutor]:
    process = ProcessExecutor(allowed=["tests.sessions"])
    yield process
    process.close()


def test_reports_cross_the_process_boundary(executor: ProcessExecutor) -> None:
    link = Link()
    result = executor.run("tests.sessions:reports_steps", {"x": 1.0}, link, 1, None)
    assert (result.kind, result.values) == ("done", [1.0])
    assert [step for step, _ in link.steps] == list(range(10))
    assert link.steps[0] == (0, 2.0)


def test_the_trial_context_crosses_the_process_boundary(executor: ProcessExecutor) -> None:
    link = Link()
    result = executor.run("tests.sessions:uses_the_trial_context", {"x": 1.0}, link, 1, None)
    assert (result.kind, result.values) == ("done", [7.0])  # trial().number
    assert link.attrs == {
        "accuracy": 0.75, "seen": {"study": "s", "attempt": 1, "worker": "host:1"}
    }  # fmt: skip
    assert link.logged == [(None, {"accuracy": 0.75})]  # trial().log crosses as one message
    bad = executor.run("tests.sessions:sets_a_reserved_attr", {}, link, 1, None)
    assert bad.kind == "failed"
    assert bad.error == "ValueError: trial().set_attr: 'worker' is the framework's own attribute"


def test_prune_and_lost_answers_stop_the_session(executor: ProcessExecutor) -> None:
    pruned = Link(prune_at=3)
    result = executor.run("tests.sessions:reports_steps", {"x": 1.0}, pruned, 1, None)
    assert (result.kind, result.error) == ("pruned", "pruned at step 3")
    assert len(pruned.steps) == 4
    result = executor.run("tests.sessions:reports_steps", {"x": 1.0}, Link(lost_at=0), 1, None)
    assert result.kind == "lost"


def test_a_report_the_supervisor_cannot_save_fails_the_trial(executor: ProcessExecutor) -> None:
    class Broken(Link):
        def report(self, value: float, step: int) -> None:
            raise RuntimeError("database unavailable while reporting a step")

    result = executor.run("tests.sessions:reports_steps", {"x": 1.0}, Broken(), 1, None)
    assert result.kind == "failed"
    assert result.error == (
        "report() failed: RuntimeError: database unavailable while reporting a step"
    )


def test_a_dead_executor_is_replaced_for_the_next_call(executor: ProcessExecutor) -> None:
    died = executor.run("tests.sessions:exits_hard", {"x": -1.0}, Link(), 1, None)
    assert (died.kind, died.error) == ("failed", "session process exited with status 3")
    again = executor.run("tests.sessions:exits_hard", {"x": 2.0}, Link(), 1, None)
    assert (again.kind, again.values) == ("done", [2.0])


def test_errors_carry_the_reason_and_a_traceback(executor: ProcessExecutor) -> None:
    result = executor.run("tests.sessions:raises", {}, Link(), 1, None)
    assert result.kind == "failed" and result.error == "RuntimeError: boom: the model diverged"
    assert result.traceback is not None and "raise RuntimeError" in result.traceback
    wrong = executor.run("tests.sessions:returns_pair", {"x": 1.0}, Link(), 1, None)
    assert (
        wrong.fatal and wrong.error == "session returned 2 values but the study has 1 directions"
    )


def test_check_refuses_what_this_host_may_not_import(executor: ProcessExecutor) -> None:
    executor.check("tests.sessions:quadratic")
    with pytest.raises(SessionError, match="outside the allowed prefixes"):
        executor.check("os:system")
    with pytest.raises(SessionError, match="has no 'missing'"):
        executor.check("tests.sessions:missing")


# --- settle ------------------------------------------------------------------------------------


@pytest.fixture
def handle(tmp_path: Path) -> Iterator[StudyHandle]:
    config = Config.from_mapping(
        make_config(study_={"n_trials": 4, "max_retries": 1, "max_failed_trials": 3}), "c.yaml"
    )
    storage = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}", create_schema=True)
    record = create_study(storage, config, check_session=False)
    yield open_study(
        Backend(storage), record, config, InProcessExecutor(sessions.quadratic), worker_id="test:1"
    )
    storage.engine.dispose()


def _failed_trial(handle: StudyHandle, **user_attrs: Any) -> tuple[int, FrozenTrial]:
    ticket = handle.backend.tickets.claim(
        handle.record.study_id, "test:1", 20.0, f"key-{user_attrs}"
    )
    assert ticket is not None
    trial = handle.study.ask()
    trial.suggest_float("x", -5.0, 5.0)
    for key, value in user_attrs.items():
        trial.set_user_attr(key, value)
    handle.study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return ticket, handle.backend.storage.get_trial(trial._trial_id)


def _waiting(handle: StudyHandle) -> list[FrozenTrial]:
    return handle.study.get_trials(states=(optuna.trial.TrialState.WAITING,))


def test_settle_requeues_the_point_then_returns_the_ticket(handle: StudyHandle) -> None:
    ticket, failed = _failed_trial(handle)
    settle_failure(handle.ledger, failed, ticket, "test:1")
    [waiting] = _waiting(handle)
    assert waiting.system_attrs["fixed_params"] == failed.params
    assert waiting.user_attrs == {"retry_of": failed.number, "attempt": 1}
    record = Registry(handle.backend.storage.engine).get(handle.name)
    assert (record.failures, record.state, record.claimed) == (1, "open", 0)


def test_settling_twice_changes_nothing(handle: StudyHandle) -> None:
    """What a retry after a lost answer does: the second settlement finds the first."""
    ticket, failed = _failed_trial(handle)
    settle_failure(handle.ledger, failed, ticket, "test:1")
    settle_failure(handle.ledger, failed, ticket, "test:1")
    assert len(_waiting(handle)) == 1
    record = Registry(handle.backend.storage.engine).get(handle.name)
    assert (record.failures, record.claimed) == (1, 0)


def test_a_claim_replayed_with_its_key_takes_no_second_ticket(handle: StudyHandle) -> None:
    study_id = handle.record.study_id
    first = handle.backend.tickets.claim(study_id, "test:1", 20.0, "same-key")
    assert handle.backend.tickets.claim(study_id, "test:1", 20.0, "same-key") == first
    assert Registry(handle.backend.storage.engine).get(handle.name).claimed == 1


def test_settle_stops_retrying_after_max_retries(handle: StudyHandle) -> None:
    ticket, failed = _failed_trial(handle, attempt=1, retry_of=0)
    settle_failure(handle.ledger, failed, ticket, "test:1")
    assert _waiting(handle) == []
    assert Registry(handle.backend.storage.engine).get(handle.name).failures == 1


def test_only_the_holder_settles_a_ticket(handle: StudyHandle) -> None:
    ticket, failed = _failed_trial(handle)
    assert (
        handle.backend.tickets.settle(ticket, "someone:else", returned=True, failure=True) is None
    )
    record = Registry(handle.backend.storage.engine).get(handle.name)
    assert (record.failures, record.claimed) == (0, 1)


# --- what a worker may decide about a study ----------------------------------------------------


def test_a_package_missing_on_this_host_is_the_hosts_problem(
    handle: StudyHandle, executor: ProcessExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gp sampler needs torch: a host without it skips the study; it is not invalid."""
    raw = {**handle.record.config, "study": {**handle.record.config["study"], "sampler": "gp"}}
    record = type(handle.record)(**{**handle.record.__dict__, "config": raw})
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    with pytest.raises(CannotServeHere, match="needs the Python package 'torch'"):
        load_for_serving(handle.backend, record, executor, "test:1")
    broken = type(handle.record)(**{**handle.record.__dict__, "config": {"study": {}}})
    with pytest.raises(InvalidStudy, match=r"study\.name"):
        load_for_serving(handle.backend, broken, executor, "test:1")


def test_patience_counts_trials_finished_after_the_best_by_the_clock() -> None:
    from datetime import datetime, timedelta

    from optuna.distributions import FloatDistribution

    from hpo_framework.config.schema import StopWhen
    from hpo_framework.runtime.stopping import stop_reason

    start = datetime(2026, 1, 1)

    def done(number: int, value: float, second: int) -> optuna.trial.FrozenTrial:
        t = optuna.trial.create_trial(
            value=value, params={"x": 0.0}, distributions={"x": FloatDistribution(0, 1)}
        )
        t.number, t.datetime_complete = number, start + timedelta(seconds=second)
        return t

    # trials 1..5 finished (pruned fast, say) before trial 0, which turned out best
    fast = [done(n, 9.0, n) for n in range(1, 6)]
    best = done(0, 1.0, 10)
    rule = StopWhen(patience=3)
    assert stop_reason(rule, False, [*fast, best], best) is None
    later = [done(n, 5.0, 10 + n) for n in range(6, 9)]
    assert stop_reason(rule, False, [*fast, best, *later], later[-1]) == (
        "stop_when.patience: 3 finished trials without improvement since trial 0 (1)"
    )


def test_a_ticket_is_never_mistaken_for_an_older_one_with_its_id(handle: StudyHandle) -> None:
    """A trial names its ticket by id. Ids are not reused (SQLite autoincrement), and the
    recovery's lookup of a trial made but not yet bound takes only a RUNNING one: a finished
    trial named by an older ticket with the same id must not count as this ticket's."""
    tickets, study_id = handle.backend.tickets, handle.record.study_id
    first = tickets.claim(study_id, "test:1", 20.0, "key-1")
    assert first is not None
    assert tickets.settle(first, "test:1", returned=True, failure=False) == "open"
    second = tickets.claim(study_id, "test:1", 20.0, "key-2")
    assert second is not None and second != first  # the deleted row's id is not taken again
    # a finished trial claiming to be the new ticket's (as one of a reused id would)
    old = optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE, value=1.0, system_attrs={"hpo:ticket": second}
    )
    handle.study.add_trial(old)
    assert tickets.trial_of(second) is None
