"""The read side decodes Optuna's tables as Optuna does, and ``hpo-inspect`` needs no Optuna."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa

from hpo_framework.storage import trial_reads
from hpo_framework.storage.database import open_engine
from tests.conftest import ROOT, cli_env, make_config, run_cli, write_config

DISTRIBUTIONS = {
    "f": optuna.distributions.FloatDistribution(1e-5, 1.0, log=True),
    "s": optuna.distributions.FloatDistribution(0.0, 1.0, step=0.1),
    "i": optuna.distributions.IntDistribution(1, 64, log=True),
    "c": optuna.distributions.CategoricalDistribution(["a", None, 3, 2.5, True, "[1]"]),
}


@pytest.fixture(params=["sqlite", "psycopg2", "psycopg"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'reads.db'}"
    url = str(request.getfixturevalue("pg_url"))
    return url.replace("+psycopg2", f"+{request.param}")


def test_trials_read_without_optuna_are_the_trials_optuna_reads(any_url: str) -> None:
    storage = optuna.storages.RDBStorage(any_url)
    study = optuna.create_study(storage=storage, directions=["minimize", "maximize"])
    for k, values in enumerate([[0.1, 2.0], [float("inf"), float("-inf")], [1 / 3, -0.0]]):
        study.add_trial(
            optuna.trial.create_trial(
                params={"f": 10 ** -(k + 1), "s": 0.1 * k, "i": 2**k, "c": [None, 3, "[1]"][k]},
                distributions=DISTRIBUTIONS,
                values=values,
                user_attrs={"u": [k, {"x": "y"}], "worker": f"h:{k}"},
                intermediate_values={0: 1.5, 1: float("nan"), 2: float("-inf")},
            )  # fmt: skip
        )
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    study.ask({"c": DISTRIBUTIONS["c"]})  # running, with one parameter
    study.enqueue_trial({"i": 4})  # waiting
    theirs = storage.get_all_trials(study._study_id)
    ids = [t._trial_id for t in reversed(theirs)]
    for ours in (
        trial_reads.read_trials(storage.engine, study_id=study._study_id),
        list(reversed(trial_reads.read_trials(storage.engine, ids))),
    ):
        assert len(ours) == len(theirs) == 6
        for mine, optunas in zip(ours, theirs, strict=True):
            fields = ("number", "values", "params", "user_attrs", "intermediate_values",
                      "datetime_start", "datetime_complete", "duration")  # fmt: skip
            for name in fields:  # repr: NaN equals NaN, and 1 is not True
                assert repr(getattr(mine, name)) == repr(getattr(optunas, name)), name
            assert mine.state == optunas.state.name
            assert {k: type(v) for k, v in mine.params.items()} == {
                k: type(v) for k, v in optunas.params.items()
            }
    assert trial_reads.read_trials(storage.engine, []) == []
    assert trial_reads.directions(storage.engine, study._study_id) == ["MINIMIZE", "MAXIMIZE"]
    study.set_user_attr("note", {"a": [1, 2]})
    assert trial_reads.study_attrs(storage.engine, study._study_id) == {"note": {"a": [1, 2]}}
    storage.engine.dispose()


@pytest.mark.parametrize(
    "distribution",
    [
        '{"name": "UniformDistribution", "attributes": {"low": -1.0, "high": 1.0}}',
        '{"name": "LogUniformDistribution", "attributes": {"low": 0.1, "high": 1.0}}',
        '{"name": "DiscreteUniformDistribution", "attributes": {"low": 0, "high": 1, "q": 0.5}}',
        '{"name": "IntUniformDistribution", "attributes": {"low": 0, "high": 10, "step": 2}}',
        '{"name": "IntLogUniformDistribution", "attributes": {"low": 1, "high": 8}}',
        '{"name": "IntDistribution", "attributes": {"low": 0, "high": 9, "step": 1}}',
        '{"name": "CategoricalDistribution", "attributes": {"choices": [1, "1", null, 1.5]}}',
    ],
)
def test_old_and_new_distributions_decode_as_optuna_decodes_them(distribution: str) -> None:
    """Studies made by Optuna 2 still hold its distributions' names in old databases."""
    with pytest.warns(FutureWarning) if "Uniform" in distribution else contextlib.nullcontext():
        d = optuna.distributions.json_to_distribution(distribution)
    for internal in (0.0, 1.0, 2.0):
        if d._contains(internal):
            theirs = d.to_external_repr(internal)
            ours = trial_reads.external_value(internal, distribution)
            assert repr(ours) == repr(theirs) and type(ours) is type(theirs)


def test_hpo_inspect_shows_a_study_without_importing_optuna(
    storage_url: str, tmp_path: Path
) -> None:
    """The table, --trial, --workers, --best-config and the JSON of every trial of a study of
    one objective: read through an engine, the way ``hpo-inspect`` runs them."""
    config = make_config(
        search_space={
            "x": {"type": "float", "low": -5.0, "high": 5.0},
            "shape": {"type": "categorical", "choices": [[8, 8], [16], {"a": 1}]},
        },
        static={"epochs": 2},
    )
    path = write_config(tmp_path / "config.yaml", config)
    run_cli("hpo-coordinator", "run", str(path), url=storage_url)
    best, trial = tmp_path / "best.yaml", tmp_path / "trial.json"
    script = (
        "import sys\n"
        "from hpo_framework.cli.inspecting import inspect_command\n"
        "for args in (['test-study'], ['--workers'], ['test-study', '--format', 'json'], [],\n"
        f"             ['test-study', '--trial', '2', '--format', 'json', '-o', {str(trial)!r}],\n"
        f"             ['test-study', '--best-config', {str(best)!r}]):\n"
        "    try:\n"
        "        inspect_command(args)\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, (args, e.code)\n"
        "print('optuna loaded:', [m for m in sys.modules if m.split('.')[0] == 'optuna'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=cli_env(storage_url), cwd=ROOT,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "optuna loaded: []" in done.stdout, done.stdout[-2000:]
    detail = json.loads(trial.read_text())
    assert detail["number"] == 2 and detail["cfg"]["epochs"] == 2
    assert detail["cfg"]["shape"] in ([8, 8], [16], {"a": 1})  # the list, as the session got it
    assert "shape" in best.read_text() and "epochs: 2" in best.read_text()


def test_open_engine_checks_optunas_schema_revision(sqlite_url: str) -> None:
    optuna.storages.RDBStorage(sqlite_url).engine.dispose()
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'v9'"))
    engine.dispose()
    with pytest.raises(Exception, match="schema revision v9"):
        open_engine(sqlite_url)
