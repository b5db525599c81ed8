"""What a trial costs the database, counted (not timed, so it holds on a loaded machine), and
what the framework's own trial writes (``trial_store``) look like to plain Optuna.

The docs promise at most 8 statements in at most 4 transactions per trial (TPE, one
worker, the benchmark's study shape); an Optuna upgrade that changes the tables the trial
store writes fails the round-trip test here.
"""

from __future__ import annotations

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from bench.sql_counter import SqlCounter
from hpo_framework.config.schema import Config
from hpo_framework.exceptions import StorageError
from hpo_framework.operations.coordinator import create_study
from hpo_framework.runtime.executor import InProcessExecutor
from hpo_framework.runtime.heartbeat import Heartbeat
from hpo_framework.runtime.trials import StudyHandle, open_study
from hpo_framework.storage.backend import Backend
from hpo_framework.storage.database import open_storage
from hpo_framework.storage.trial_store import Told, TrialStore
from tests import sessions
from tests.conftest import make_config

STATEMENTS_PER_TRIAL = 8
TRANSACTIONS_PER_TRIAL = 4


def _handle(url: str, session: object, **study: object) -> StudyHandle:
    config = Config.from_mapping(
        make_config(
            study_={
                "n_trials": 40,
                **study,
                "sampler": {"name": "tpe", "seed": 0, "options": {"n_startup_trials": 10}},
            },
        ),  # fmt: skip
        "c.yaml",
    )
    storage = open_storage(url, create_schema=True)
    record = create_study(storage, config, check_session=False)
    return open_study(
        Backend(storage), record, config, InProcessExecutor(session), worker_id="t:1"
    )


def test_a_trial_costs_at_most_8_statements_in_4_transactions(pg_driver_url: str) -> None:
    handle = _handle(pg_driver_url, sessions.quadratic)
    counter = SqlCounter(handle.backend.storage.engine)
    with Heartbeat(handle.backend.storage) as heartbeat:
        for _ in range(12):  # past TPE's start-up trials: the model's trials are measured
            assert handle.run_one(heartbeat) is not None
        with counter.counting():
            ran = sum(handle.run_one(heartbeat) is not None for _ in range(20))
    assert ran == 20
    per_trial = counter.statements / ran, counter.transactions / ran
    assert per_trial[0] <= STATEMENTS_PER_TRIAL, counter.by_statement.most_common(10)
    assert per_trial[1] <= TRANSACTIONS_PER_TRIAL, per_trial
    handle.backend.storage.engine.dispose()


def test_trials_written_by_the_trial_store_read_back_through_plain_optuna(
    pg_driver_url: str,
) -> None:
    """Own trials are written without Optuna's code: Optuna must read them as its own."""
    handle = _handle(
        pg_driver_url, sessions.two_objectives,
        directions=["minimize", "maximize"], n_trials=6, direction=None,
    )  # fmt: skip
    with Heartbeat(handle.backend.storage) as heartbeat:
        while handle.run_one(heartbeat) is not None:
            pass
    stored = optuna.load_study(study_name=handle.name, storage=pg_driver_url).trials
    assert [t.number for t in stored] == list(range(6))
    for trial in stored:
        assert trial.state == TrialState.COMPLETE
        assert set(trial.params) == {"x"} and -5 <= trial.params["x"] <= 5
        assert trial.values == list(sessions.two_objectives({"x": trial.params["x"]}))
        assert trial.user_attrs["worker"] == "t:1"
        assert trial.datetime_start is not None and trial.datetime_complete is not None
        assert trial.datetime_complete >= trial.datetime_start
    handle.backend.storage.engine.dispose()


def test_a_report_and_a_pruned_trial_go_through_the_trial_store(pg_url: str) -> None:
    handle = _handle(
        pg_url, sessions.reports_steps, n_trials=12,
        pruner={"name": "median", "options": {"n_startup_trials": 2, "n_warmup_steps": 0}},
    )  # fmt: skip
    with Heartbeat(handle.backend.storage) as heartbeat:
        outcomes = []
        while (outcome := handle.run_one(heartbeat)) is not None:
            outcomes.append(outcome)
    stored = {
        t.number: t for t in optuna.load_study(study_name=handle.name, storage=pg_url).trials
    }
    assert len(stored) == 12
    for outcome in outcomes:
        trial = stored[outcome.number]
        assert trial.state == outcome.state
        assert trial.intermediate_values, trial
        if trial.state == TrialState.PRUNED:  # Optuna's tell keeps the last report as value
            assert trial.value == trial.intermediate_values[max(trial.intermediate_values)]
    handle.backend.storage.engine.dispose()


def test_a_trial_failed_by_another_worker_refuses_the_late_result(sqlite_url: str) -> None:
    """Memory is not the truth: the late write is checked against the database."""
    handle = _handle(sqlite_url, sessions.quadratic, n_trials=2)
    store = handle.store
    with Heartbeat(handle.backend.storage) as heartbeat:
        handle.run_one(heartbeat)
    ticket = handle.backend.tickets.claim(handle.record.study_id, "t:1", 20.0, "k")
    assert ticket is not None
    trial_id = store.start(handle.record.study_id, ticket, "k", "t:1", handle.backend.tickets)
    assert trial_id is not None
    handle.backend.storage.set_trial_state_values(trial_id, TrialState.FAIL)  # "the stale sweep"
    assert store.get_trial(trial_id).state == TrialState.RUNNING  # what this worker believes
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        store.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0])
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        store.set_trial_param(
            trial_id, "x", 0.5, optuna.distributions.FloatDistribution(-5.0, 5.0)
        )
    assert handle.backend.storage.get_trial(trial_id).state == TrialState.FAIL
    handle.backend.storage.engine.dispose()


def test_the_trial_store_reads_what_others_wrote(sqlite_url: str) -> None:
    """Only the sampler's reads within one ask share a sync; a later read sees new trials."""
    handle = _handle(sqlite_url, sessions.quadratic, n_trials=4)
    with Heartbeat(handle.backend.storage) as heartbeat:
        handle.run_one(heartbeat)
    assert len(handle.study.trials) == 1
    optuna.load_study(study_name=handle.name, storage=sqlite_url).enqueue_trial({"x": 1.0})
    assert [t.state for t in handle.study.trials] == [TrialState.COMPLETE, TrialState.WAITING]
    handle.backend.storage.engine.dispose()


def test_workers_open_the_schema_as_optuna_would_without_its_version_manager(
    sqlite_url: str,
) -> None:
    """The light opener sets what RDBStorage sets and checks the revision Optuna would."""
    from hpo_framework.storage.database import OPTUNA_SCHEMA_HEAD

    full = open_storage(sqlite_url, create_schema=True)
    assert full._version_manager.get_head_version() == OPTUNA_SCHEMA_HEAD
    light = open_storage(sqlite_url, create_schema=False)
    assert type(light) is not type(full) and isinstance(light, optuna.storages.RDBStorage)
    assert sorted(vars(light)) == sorted(vars(full))
    with light.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'v1.0.0'"))
    with pytest.raises(
        StorageError, match="Optuna schema revision v1.0.0.*optuna storage upgrade"
    ):
        open_storage(sqlite_url, create_schema=False)
    full.engine.dispose()
    light.engine.dispose()


def test_inspect_reads_do_not_grow_with_the_study(pg_url: str) -> None:
    """``hpo-inspect NAME`` (the table) and ``--trial N`` issue as many statements on a study
    of 20 trials as on one of 1,200 (beyond the 500 ids a SQLAlchemy
    "selectin" query takes at once): they read the trials they show, not the study."""
    from hpo_framework.views import inspection

    def statements(n_trials: int) -> tuple[int, int]:
        name = f"size-{n_trials}"
        config = Config.from_mapping(make_config(study_={"name": name}), "c.yaml")
        storage = open_storage(pg_url, create_schema=True)
        create_study(storage, config, check_session=False)
        study = optuna.load_study(study_name=name, storage=storage)
        dist = optuna.distributions.FloatDistribution(-5.0, 5.0)
        study.add_trials(
            [
                optuna.trial.create_trial(
                    params={"x": i / n_trials},
                    distributions={"x": dist},
                    value=float(i),
                    user_attrs={"retry_of": 0} if i % 7 == 3 else {},
                )  # fmt: skip
                for i in range(n_trials)
            ]
        )
        counter = SqlCounter(storage.engine)
        with counter.counting():
            inspection.summarize(storage, name, all_trials=False)
        table = counter.statements
        counter = SqlCounter(storage.engine)
        with counter.counting():
            detail = inspection.trial_detail(storage, name, 0)
        assert len(detail["attempts"]) == 1 + len(range(3, n_trials, 7))  # trial 0, retries
        storage.engine.dispose()
        return table, counter.statements

    small, large = statements(20), statements(1200)
    assert small == large, (small, large)


def test_the_one_statement_sync_reads_what_optuna_reads(pg_driver_url: str) -> None:
    """``trial_sync`` builds the same trials as Optuna's own read, for every kind of row:
    each distribution, infinite and NaN values, several objectives, attributes, steps."""
    from hpo_framework.storage import trial_sync

    storage = optuna.storages.RDBStorage(pg_driver_url)
    study = optuna.create_study(storage=storage, directions=["minimize", "maximize"])
    dists = {
        "f": optuna.distributions.FloatDistribution(1e-5, 1.0, log=True),
        "s": optuna.distributions.FloatDistribution(0.0, 1.0, step=0.1),
        "i": optuna.distributions.IntDistribution(1, 64, log=True),
        "c": optuna.distributions.CategoricalDistribution(["a", None, 3, 2.5, True]),
    }
    for k, values in enumerate([[0.1, 2.0], [float("inf"), float("-inf")], [1 / 3, 1e-300]]):
        study.add_trial(
            optuna.trial.create_trial(
                params={"f": 10 ** -(k + 1), "s": 0.1 * k, "i": 2**k, "c": [None, 3, 2.5][k]},
                distributions=dists,
                values=values,
                user_attrs={"u": [k, {"x": "y"}]},
                system_attrs={"s": k},
                intermediate_values={0: 1.5, 1: float("nan"), 2: -0.0},
            )  # fmt: skip
        )
    running = study.ask({"c": dists["c"]})
    running.set_user_attr("w", "t:1")
    study_id = study._study_id
    ours = trial_sync.read_trials(storage.engine, study_id, unfinished=set(), after=-1)
    theirs = storage.get_all_trials(study_id)
    assert repr(ours) == repr(theirs)  # repr: NaN == NaN, and every field
    later = trial_sync.read_trials(storage.engine, study_id, {running._trial_id}, after=10**9)
    assert [t.number for t in later] == [running.number]
    many = set(range(10**6, 10**6 + 70_000))  # past psycopg 3's 65,535 parameters a statement
    assert trial_sync.read_trials(storage.engine, study_id, many, after=10**9) == []
    with pytest.raises(KeyError):
        trial_sync.read_trials(storage.engine, study_id + 1000, unfinished=set(), after=-1)
    storage.engine.dispose()


def test_a_worker_searches_exactly_as_plain_optuna_with_the_same_seed(pg_url: str) -> None:
    """The trial store changes how trials are read and written, not what the sampler sees:
    one worker and plain Optuna's ``optimize`` with the same TPE seed try the same points."""
    handle = _handle(pg_url, sessions.quadratic, n_trials=24)
    with Heartbeat(handle.backend.storage) as heartbeat:
        while handle.run_one(heartbeat) is not None:
            pass
    ours = [t.params["x"] for t in handle.study.get_trials(deepcopy=False)]
    handle.backend.storage.engine.dispose()

    def objective(trial: optuna.Trial) -> float:
        return sessions.quadratic({"x": trial.suggest_float("x", -5.0, 5.0)})

    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=10)
    plain = optuna.create_study(storage=pg_url, study_name="plain", sampler=sampler)
    plain.optimize(objective, n_trials=24)
    assert len(ours) == 24
    assert ours == [t.params["x"] for t in plain.trials]


def _begin(handle: StudyHandle, key: str) -> tuple[int, int]:
    ticket, trial_id = handle.store.begin(
        handle.record.study_id, key, "t:1", 20.0, handle.backend.tickets
    )
    assert ticket is not None and trial_id is not None
    return ticket, trial_id


def test_a_trial_begins_in_one_transaction_and_a_replay_finds_it(pg_driver_url: str) -> None:
    """The claim and the new trial commit together; the same step replayed with its key (its
    answer lost) finds that ticket and that trial instead of taking a second of either."""
    handle = _handle(pg_driver_url, sessions.quadratic, n_trials=3)
    counter = SqlCounter(handle.backend.engine)
    with counter.counting():
        first = _begin(handle, "key-1")
    assert counter.transactions == 1, counter.by_statement
    assert _begin(handle, "key-1") == first
    study_id = handle.record.study_id
    assert [t._trial_id for t in handle.backend.storage.get_all_trials(study_id)] == [first[1]]
    record = handle.backend.registry.by_id(study_id)
    assert record is not None and record.claimed == 1
    handle.backend.storage.engine.dispose()


def test_sampled_values_are_written_together_and_only_while_the_trial_runs(pg_url: str) -> None:
    handle = _handle(pg_url, sessions.quadratic, n_trials=4)
    with Heartbeat(handle.backend.storage) as heartbeat:
        handle.run_one(heartbeat)  # the study now knows x's distribution
    store, storage = handle.store, handle.backend.storage
    x = optuna.distributions.FloatDistribution(-5.0, 5.0)
    _, trial_id = _begin(handle, "key-1")
    with store.one_sync():
        store.set_trial_param(trial_id, "x", 0.5, x)
        store.set_trial_system_attr(trial_id, "sampler:state", [1, 2])
        assert storage.get_trial(trial_id).params == {}  # held for one transaction
    written = storage.get_trial(trial_id)
    assert written.params == {"x": 0.5} and written.system_attrs["sampler:state"] == [1, 2]
    _, lost = _begin(handle, "key-2")
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError), store.one_sync():
        store.set_trial_param(lost, "x", 0.25, x)
        assert handle.backend.fail_trial(lost, "worker lost")  # the sweep of another worker
    assert storage.get_trial(lost).params == {}
    storage.engine.dispose()


def test_a_result_spends_its_ticket_in_its_own_transaction(pg_url: str) -> None:
    handle = _handle(pg_url, sessions.quadratic, n_trials=4)
    study_id, tickets, study = handle.record.study_id, handle.backend.tickets, handle.study
    ticket, trial_id = _begin(handle, "key-1")
    told = handle.store.tell(
        study, optuna.Trial(study, trial_id), TrialState.COMPLETE, [1.0], None,
        spends=(ticket, "t:1"),
    )  # fmt: skip
    assert told == Told(kept=True, settled=True) and tickets.held(study_id) == 0
    record = handle.backend.registry.by_id(study_id)
    assert record is not None and record.claimed == 1  # spent, not returned
    # A result that comes too late (its trial failed as stale) spends nothing.
    ticket, trial_id = _begin(handle, "key-2")
    assert handle.backend.fail_trial(trial_id, "worker lost")
    told = handle.store.tell(
        study, optuna.Trial(study, trial_id), TrialState.COMPLETE, [2.0], None,
        spends=(ticket, "t:1"),
    )  # fmt: skip
    assert told == Told(kept=False, settled=False) and tickets.held(study_id) == 1
    handle.backend.storage.engine.dispose()


def test_a_ticket_whose_trial_never_began_goes_back_at_once(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every waiting trial popped by others first: the ticket's unit of budget goes back now,
    not after a grace period of silence."""
    handle = _handle(pg_url, sessions.quadratic, n_trials=2)
    optuna.load_study(study_name=handle.name, storage=pg_url).enqueue_trial({"x": 1.0})
    monkeypatch.setattr(TrialStore, "_start", lambda *args: None)  # each pop lost to another
    with Heartbeat(handle.backend.storage) as heartbeat:
        assert handle.run_one(heartbeat) is None
    study_id = handle.record.study_id
    record = handle.backend.registry.by_id(study_id)
    assert record is not None and record.claimed == 0
    assert handle.backend.tickets.held(study_id) == 0
    handle.backend.storage.engine.dispose()
