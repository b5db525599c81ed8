"""run_hpo end to end: results, failures, pruning, several objectives, warm starts, storage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hpo_framework import (
    ConfigError,
    StudyExistsError,
    report,
    resolve_storage_url,
    run_hpo,
)
from hpo_framework.storage.database import open_storage
from hpo_framework.views.inspection import summarize
from tests import sessions
from tests.checkpoint_stores import Store
from tests.conftest import ROOT, cli_env, make_config, run_cli, write_config


def run(tmp_path: Path, session, url: str | None = None, **overrides) -> optuna.Study:  # type: ignore[no-untyped-def]
    path = write_config(tmp_path / "config.yaml", make_config(**overrides))
    return run_hpo(session, path, url or f"sqlite:///{tmp_path / 'hpo.db'}")


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.trials]


def test_run_hpo_optimizes_and_returns_the_study(storage_url: str, tmp_path: Path) -> None:
    study = run(tmp_path, sessions.quadratic, storage_url, study_={"n_trials": 12})
    assert states(study) == ["COMPLETE"] * 12
    assert study.best_value < 1.0
    assert all(t.user_attrs["worker"].endswith(f":{os.getpid()}") for t in study.trials)
    assert all(t.duration is not None for t in study.trials)


@pytest.mark.parametrize(
    ("session", "error"),
    [
        (sessions.raises, "RuntimeError: boom: the model diverged"),
        (sessions.returns_nan, "session returned nan, not a finite number"),
        (sessions.returns_inf, "session returned inf, not a finite number"),
        (sessions.returns_none, "session returned None (NoneType), not a number"),
        (sessions.returns_str, "session returned '0.5' (str), not a number"),
        (sessions.calls_exit, "session called sys.exit(3)"),
    ],
)
def test_a_bad_session_fails_its_trial_with_the_error_recorded(
    tmp_path: Path,
    session,
    error: str,  # type: ignore[no-untyped-def]
) -> None:
    study = run(tmp_path, session, study_={"n_trials": 5, "max_failed_trials": 3})
    assert states(study) == ["FAIL"] * 3  # max_failed_trials stops the study
    assert {t.user_attrs["error"] for t in study.trials} == {error}


def test_failed_parameters_are_retried_and_the_study_goes_on(
    storage_url: str, tmp_path: Path
) -> None:
    study = run(
        tmp_path, sessions.fail_first_attempt, storage_url, static={"dir": str(tmp_path)},
        study_={"n_trials": 4, "max_retries": 1, "max_failed_trials": 10},
    )  # fmt: skip
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4  # the budget counts finished trials only
    assert len(failed) == 4  # every new point failed once...
    retried = {t.params["x"] for t in complete if t.user_attrs.get("retry_of") is not None}
    assert retried == {t.params["x"] for t in failed}  # ...and its parameters ran again


def test_retries_stop_after_max_retries(storage_url: str, tmp_path: Path) -> None:
    study = run(
        tmp_path,
        sessions.raises,
        storage_url,
        study_={"n_trials": 2, "max_retries": 2, "max_failed_trials": 3},
    )
    assert [t.user_attrs.get("attempt", 0) for t in study.trials] == [0, 1, 2]
    assert len({t.params["x"] for t in study.trials}) == 1


def test_pruning_through_report(storage_url: str, tmp_path: Path) -> None:
    study = run(
        tmp_path, sessions.reports_steps, storage_url,
        study_={"n_trials": 16, "pruner": {"name": "median", "options": {"n_startup_trials": 4}}},
    )  # fmt: skip
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, "the median pruner never pruned"
    assert all(len(t.intermediate_values) < 10 for t in pruned)
    assert all(
        len(t.intermediate_values) == 10 for t in study.trials if t.state == TrialState.COMPLETE
    )


def test_report_outside_a_trial_is_a_no_op() -> None:
    report(1.0, 0)
    assert sessions.reports_steps({"x": 1.5}) == 1.5


def test_multi_objective(storage_url: str, tmp_path: Path) -> None:
    study = run(
        tmp_path, sessions.two_objectives, storage_url,
        study_={"direction": None, "directions": ["minimize", "minimize"], "n_trials": 8,
                "sampler": {"name": "nsga2", "seed": 0}},
    )  # fmt: skip
    assert states(study) == ["COMPLETE"] * 8
    assert all(len(t.values) == 2 for t in study.trials)
    assert study.best_trials


def test_direction_count_mismatch_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"study.direction: session returned 2 values but the study has 1 directions",
    ):
        run(tmp_path, sessions.returns_pair)


def test_enqueued_points_run_first_and_exactly_once(storage_url: str, tmp_path: Path) -> None:
    enqueue = [{"x": 1.5}, {"x": -2.0}]
    path = write_config(
        tmp_path / "config.yaml", make_config(enqueue=enqueue, study_={"n_trials": 5})
    )
    url = storage_url
    study = run_hpo(sessions.quadratic, path, url)
    assert [t.params["x"] for t in study.trials[:2]] == [1.5, -2.0]
    # Running again resumes the finished study: nothing is enqueued or run twice.
    again = run_hpo(sessions.quadratic, path, url)
    assert len(again.trials) == 5


def test_a_raised_budget_carries_on_and_another_space_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    run_hpo(sessions.quadratic, write_config(tmp_path / "a.yaml", make_config()), url)
    raised = write_config(tmp_path / "a.yaml", make_config(study_={"n_trials": 8}))
    assert len(run_hpo(sessions.quadratic, raised, url).trials) == 8  # 6 + 2 more
    space = {"x": {"type": "float", "low": 0.0, "high": 5.0}}
    changed = write_config(tmp_path / "a.yaml", make_config(search_space=space))
    with pytest.raises(StudyExistsError, match=r"different config \(search_space\.x differ\)"):
        run_hpo(sessions.quadratic, changed, url)


def test_storage_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_storage_url(None, None) == "sqlite:///hpo.db"
    assert resolve_storage_url(None, "sqlite:///config.db") == "sqlite:///config.db"
    monkeypatch.setenv("HPO_STORAGE", "sqlite:///env.db")
    assert resolve_storage_url(None, "sqlite:///config.db") == "sqlite:///env.db"
    assert resolve_storage_url("sqlite:///arg.db", "sqlite:///config.db") == "sqlite:///arg.db"


def test_config_storage_key_is_used(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.yaml", make_config(storage=f"sqlite:///{tmp_path / 'from-config.db'}")
    )
    run_hpo(sessions.quadratic, path)
    assert (tmp_path / "from-config.db").exists()


def test_timeout_ends_the_study(tmp_path: Path) -> None:
    study = run(
        tmp_path, sessions.quadratic, static={"sleep_s": 0.3},
        study_={"n_trials": 100, "timeout": 1},
    )  # fmt: skip
    # 0.3 s trials in a 1 s budget: a few at most (a loaded machine starts fewer, even none
    # before the deadline: no lower bound), and the study says why it ended
    assert len(study.trials) <= 6
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    assert (
        summarize(open_storage(url, create_schema=False), study.study_name)["state"] == "timeout"
    )


def test_linear_regression_example_beats_the_untrained_baseline(tmp_path: Path) -> None:
    from experiments.linear_regression import single_session, untrained_mse

    config = write_config(
        tmp_path / "config.yaml",
        (ROOT / "config.yaml")
        .read_text()
        .replace("n_trials: 30", "n_trials: 6")
        .replace("epochs: 20", "epochs: 5"),
    )
    study = run_hpo(single_session, config, f"sqlite:///{tmp_path / 'lr.db'}")
    baseline = untrained_mse(
        {"data": {"n_samples": 2000, "n_features": 10, "noise": 0.1, "seed": 0}}
    )
    assert study.best_value < 0.1 * baseline
    assert study.trials[0].params["optimizer"] == "adam"  # the enqueued warm start ran first


def test_the_example_resumed_from_its_checkpoint_ends_as_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    from experiments.linear_regression import single_session
    from hpo_framework import unflatten
    from hpo_framework.config.param_tree import merge

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["session"] = "tests.sessions:example_interrupted"
    config["study"].update(n_trials=1, max_retries=1, pruner={"name": "none"})
    config["static"].update(epochs=12, stop_at=4)
    config["checkpoints"] = {"dir": str(tmp_path / "ckpt")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    study = run_hpo("tests.sessions:example_interrupted", path, f"sqlite:///{tmp_path / 'e.db'}")
    first, retry = study.trials
    assert first.state.name == "FAIL" and "interrupted after epoch 4" in first.user_attrs["error"]
    assert sorted(retry.intermediate_values) == list(range(5, 12))  # epochs 0-4 not run again
    # model, optimizer and random state all came back: the same score, to the last bit
    cfg = merge(config["static"], unflatten(retry.params))
    assert retry.value == single_session(cfg)


def test_run_experiment_script_prints_the_best_parameters(tmp_path: Path) -> None:
    text = (
        (ROOT / "config.yaml")
        .read_text()
        .replace("n_trials: 30", "n_trials: 3")
        .replace("epochs: 20", "epochs: 2")
    )
    config = write_config(tmp_path / "config.yaml", text)
    env = {**os.environ, "HPO_STORAGE": f"sqlite:///{tmp_path / 's.db'}"}
    result = subprocess.run(
        [sys.executable, "run_experiment.py", str(config)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "best validation MSE" in result.stdout and "best parameters {'lr':" in result.stdout


def test_run_experiment_script_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "run_experiment.py", str(tmp_path / "missing.yaml")], cwd=ROOT,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == f"error: {tmp_path / 'missing.yaml'}: file not found\n"


def test_a_study_failed_by_max_failed_trials_says_so(tmp_path: Path) -> None:
    import logging

    class Collect(logging.Handler):
        lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(f"{record.levelname} {record.getMessage()}")

    handler = Collect()
    logging.getLogger("hpo.runner").addHandler(handler)
    try:
        study = run(tmp_path, sessions.raises, study_={"n_trials": 5, "max_failed_trials": 2})
    finally:
        logging.getLogger("hpo.runner").removeHandler(handler)
    assert states(study) == ["FAIL", "FAIL"]
    assert handler.lines == ["ERROR study 'test-study' failed: max_failed_trials reached"]


def test_run_experiment_with_no_completed_trial_ends_in_one_line(tmp_path: Path) -> None:
    config = make_config(
        session="experiments.linear_regression:single_session",
        static={"epochs": 3, "data": {"n_samples": 50, "n_features": 2, "noise": 0.1,
                                      "seed": 0}},
        search_space={"lr": {"type": "float", "low": 1e30, "high": 1e31},
                      "batch_size": {"type": "categorical", "choices": [4]},
                      "optimizer": {"type": "categorical", "choices": ["sgd"]}},
        study_={"n_trials": 3, "max_failed_trials": 2, "max_retries": 0},
    )  # fmt: skip
    path = write_config(tmp_path / "c.yaml", config)
    result = subprocess.run(
        [sys.executable, "run_experiment.py", str(path)], cwd=ROOT, capture_output=True,
        text=True, timeout=300, env={**cli_env(f"sqlite:///{tmp_path / 'db'}")},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: study 'test-study' has no completed trial; see hpo-inspect"
    assert "Traceback" not in result.stderr


def test_checkpoints_of_the_best_trials_stay(tmp_path: Path, checkpoint_store: Store) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    config = make_config(
        session="tests.sessions:checkpointed", static={"dir": str(tmp_path), "epoch_s": 0},
        study_={"n_trials": 4, "sampler": {"name": "random", "seed": 2}},
        checkpoints={**checkpoint_store.config, "keep_best": 1},
    )  # fmt: skip
    study = run_hpo("tests.sessions:checkpointed", write_config(tmp_path / "c.yaml", config), url)
    # the best trial's last state, to train the final model from; the others are gone
    assert checkpoint_store.saved() == {f"point-{study.best_trial.number}.pkl": {
        "epoch": 20, "total": pytest.approx(study.best_value, abs=1e-12)
    }}  # fmt: skip
    # outside a trial, checkpoints do nothing
    from hpo_framework import checkpoint

    checkpoint.save({"epoch": 1})
    assert checkpoint.load() is None


def test_a_session_may_ask_for_parameters_itself(storage_url: str, tmp_path: Path) -> None:
    space = {"n_layers": {"type": "int", "low": 1, "high": 3}}
    config = make_config(
        session="tests.sessions:layers_by_run", search_space=space,
        static={"fail_first": True}, study_={"n_trials": 4, "max_retries": 1},
    )  # fmt: skip
    study = run_hpo("tests.sessions:layers_by_run", write_config(tmp_path / "c.yaml", config),
                    storage_url)  # fmt: skip
    by_number = {t.number: t for t in study.trials}
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4
    for t in complete:
        n = t.params["n_layers"]
        assert set(t.params) == {"n_layers", "act", *(f"units_l{i}" for i in range(n))}
        assert all(4 <= t.params[f"units_l{i}"] <= 64 for i in range(n))
        # a retry asks again and gets the failed attempt's values: the same point
        assert t.params == by_number[t.user_attrs["retry_of"]].params
    # the cfg the session got holds search_space: values only; what it asked for is apart
    best = tmp_path / "best.yaml"
    result = run_cli("hpo-inspect", "test-study", "--best-config", str(best), url=storage_url)
    assert result.returncode == 0, result.stderr
    written = yaml.safe_load(best.read_text())
    assert set(written) == {"n_layers", "fail_first", "hpo_suggested"}
    assert "note: the session asked for act, units_l0" in result.stderr
    # given back outside a study, the session's own suggest_* calls get the recorded values
    final = run_cli(
        "python", "-c",
        "from hpo_framework import load_best\n"
        "from tests.sessions import layers_by_run\n"
        f"cfg = load_best({str(best)!r})\n"
        "print(sorted(cfg), repr(layers_by_run(cfg)))",
    )  # fmt: skip
    assert final.returncode == 0, final.stderr
    assert final.stdout.split("] ")[0] == "['fail_first', 'n_layers'"  # no hpo_suggested in cfg
    assert float(final.stdout.split("] ")[1]) == study.best_value
    # search_space: owns its names; asking for one fails the trial, saying so
    asks = make_config(
        session="tests.sessions:layers_by_run", search_space=space,
        static={"ask_for": "n_layers"}, study_={"name": "asks", "n_trials": 1,
                                               "max_failed_trials": 1},
    )  # fmt: skip
    failed = run_hpo("tests.sessions:layers_by_run", write_config(tmp_path / "a.yaml", asks),
                     storage_url)  # fmt: skip
    assert failed.trials[0].user_attrs["error"] == (
        "trial().suggest failed: ValueError: 'n_layers' is a parameter of search_space:; "
        "it arrives in cfg"
    )


def test_constraints_reach_the_sampler(storage_url: str, tmp_path: Path) -> None:
    config = make_config(
        session="tests.sessions:constrained",
        study_={"n_trials": 12,
                "sampler": {"name": "tpe", "seed": 3, "options": {"n_startup_trials": 4}}},
    )  # fmt: skip
    study = run_hpo("tests.sessions:constrained", write_config(tmp_path / "c.yaml", config),
                    storage_url)  # fmt: skip
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 12
    for t in complete:  # Optuna's own constraints, which its samplers steer by
        assert t.constraints == {"x_at_most_1": t.params["x"] - 1.0}
    # TPE with constraints prefers the feasible side once it has seen both
    later = [t.params["x"] <= 1.0 for t in complete[4:]]
    assert sum(later) >= len(later) // 2
