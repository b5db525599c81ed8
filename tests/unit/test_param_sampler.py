"""The search space: every distribution kind, conditions, nesting, and the cfg a session sees."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import optuna
import pytest

from hpo_framework import ConfigError, load_config, run_hpo
from hpo_framework._checks import Checker
from hpo_framework.config.param_tree import merge
from tests import sessions
from tests.conftest import make_config, write_config

SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
    "layers": {"type": "int", "low": 1, "high": 4},
    "width": {"type": "int", "low": 8, "high": 128, "log": True},
    "units": {"type": "int", "low": 0, "high": 64, "step": 16},
    "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
    "flag": {"type": "categorical", "choices": [True, False, None, 3, 0.5]},
    "momentum": {"type": "float", "low": 0.0, "high": 0.99, "when": {"optimizer": "sgd"}},
    "nesterov": {
        "type": "categorical",
        "choices": [True, False],
        "when": {"optimizer": "sgd", "layers": [1, 2]},
    },
    "model": {"head": {"kind": {"type": "categorical", "choices": ["mlp", "linear"]}}},
}


def sampled_cfgs(tmp_path: Path, n: int = 40, **study: object) -> list[dict]:
    out = tmp_path / "cfgs.jsonl"
    config = make_config(
        session="tests.sessions:echo_cfg",
        static={"out": str(out), "data": {"n": 10, "seed": 0}, "model": {"depth": 2}},
        search_space=SPACE,
        study_={"n_trials": n, "sampler": {"name": "random", "seed": 3}, **study},
    )
    run_hpo(
        sessions.echo_cfg,
        write_config(tmp_path / "c.yaml", config),
        f"sqlite:///{tmp_path / 'db'}",
    )
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_every_kind_is_sampled_within_its_bounds(tmp_path: Path) -> None:
    cfgs = sampled_cfgs(tmp_path)
    assert len(cfgs) == 40
    for cfg in cfgs:
        assert 1e-4 <= cfg["lr"] <= 1e-1
        assert (
            round(cfg["dropout"] * 10, 6) == round(cfg["dropout"] * 10)
            and 0 <= cfg["dropout"] <= 0.5
        )
        assert cfg["layers"] in range(1, 5) and isinstance(cfg["layers"], int)
        assert 8 <= cfg["width"] <= 128
        assert cfg["units"] in (0, 16, 32, 48, 64)
        assert cfg["optimizer"] in ("sgd", "adam")
        assert cfg["flag"] in (True, False, None, 3, 0.5)
    assert {c["optimizer"] for c in cfgs} == {"sgd", "adam"}


def test_conditional_parameter_exists_only_when_its_condition_holds(tmp_path: Path) -> None:
    cfgs = sampled_cfgs(tmp_path)
    for cfg in cfgs:
        assert ("momentum" in cfg) == (cfg["optimizer"] == "sgd")
        assert ("nesterov" in cfg) == (cfg["optimizer"] == "sgd" and cfg["layers"] in (1, 2))


def test_nested_keys_become_nested_dicts_merged_with_static(tmp_path: Path) -> None:
    for cfg in sampled_cfgs(tmp_path, n=5):
        assert cfg["model"]["depth"] == 2  # static, untouched
        assert cfg["model"]["head"]["kind"] in ("mlp", "linear")  # searched, nested
        assert cfg["data"] == {"n": 10, "seed": 0}


def test_merge_keeps_static_siblings() -> None:
    assert merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"c": 9}}) == {
        "a": {"b": 1, "c": 9},
        "d": 3,
    }


def test_grid_sampler_covers_the_grid_exactly_once(tmp_path: Path) -> None:
    config = make_config(
        search_space={
            "a": {"type": "categorical", "choices": ["x", "y"]},
            "b": {"type": "int", "low": 0, "high": 2},
            "c": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.25},
        },
        session="tests.sessions:echo_cfg",
        static={"out": str(tmp_path / "cfgs.jsonl")},
        study_={"n_trials": None, "sampler": {"name": "grid"}},
    )
    study = run_hpo(
        sessions.echo_cfg,
        write_config(tmp_path / "c.yaml", config),
        f"sqlite:///{tmp_path / 'db'}",
    )
    points = {(t.params["a"], t.params["b"], t.params["c"]) for t in study.trials}
    assert len(study.trials) == 18 and len(points) == 18  # budget = grid size


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp", "nsga2", "qmc"])
def test_each_sampler_runs_a_study(
    tmp_path: Path, sampler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPO_UNSAFE_ALLOW_PICKLE", "1")  # cmaes: see docs/SECURITY.md
    config = make_config(study_={"n_trials": 6, "sampler": {"name": sampler, "seed": 0}})
    config["search_space"]["y"] = {"type": "int", "low": 0, "high": 3}
    study = run_hpo(
        sessions.quadratic,
        write_config(tmp_path / "c.yaml", config),
        f"sqlite:///{tmp_path / 'db'}",
    )
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 6


def test_sampler_seed_makes_a_run_reproducible(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", make_config(study_={"n_trials": 8}))
    a = run_hpo(sessions.quadratic, path, f"sqlite:///{tmp_path / 'a.db'}")
    b = run_hpo(sessions.quadratic, path, f"sqlite:///{tmp_path / 'b.db'}")
    assert [t.params for t in a.trials] == [t.params for t in b.trials]


def test_load_config_exposes_flat_names_for_optuna(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.yaml", make_config(search_space=SPACE)))
    assert config.search_space.names[-1] == "model.head.kind"


def test_when_compares_a_number(tmp_path: Path) -> None:
    space = {
        "n_layers": {"type": "int", "low": 1, "high": 4},
        "units_l2": {"type": "int", "low": 4, "high": 64, "when": {"n_layers": {">=": 3}}},
        "wide": {"type": "int", "low": 1, "high": 2,
                 "when": {"n_layers": {">": 1, "!=": 4}}},
    }  # fmt: skip
    out = tmp_path / "cfgs.jsonl"
    config = make_config(
        session="tests.sessions:echo_cfg", static={"out": str(out)}, search_space=space,
        study_={"n_trials": 30, "sampler": {"name": "random", "seed": 1}},
    )  # fmt: skip
    run_hpo(sessions.echo_cfg, write_config(tmp_path / "c.yaml", config),
            f"sqlite:///{tmp_path / 'db'}")  # fmt: skip
    cfgs = [json.loads(line) for line in out.read_text().splitlines()]
    assert {c["n_layers"] for c in cfgs} == {1, 2, 3, 4}
    for c in cfgs:
        assert ("units_l2" in c) == (c["n_layers"] >= 3)
        assert ("wide" in c) == (c["n_layers"] in (2, 3))


@pytest.mark.parametrize(
    ("when", "reason"),
    [
        ({"n_layers": {"=>": 2}}, "when.n_layers: unknown comparison '=>'; use one of <, <="),
        ({"n_layers": {">": "two"}}, "when.n_layers.>: must be a number, got 'two'"),
        ({"kind": {">": 1}}, "when.kind.>: a categorical parameter has no order"),
        ({"n_layers": {}}, "when.n_layers: an empty mapping compares nothing"),
    ],
)
def test_when_comparison_mistakes_are_one_line(tmp_path: Path, when: dict, reason: str) -> None:
    space = {
        "n_layers": {"type": "int", "low": 1, "high": 4},
        "kind": {"type": "categorical", "choices": ["a", "b"]},
        "x": {"type": "float", "low": 0.0, "high": 1.0, "when": when},
    }
    path = write_config(tmp_path / "c.yaml", make_config(search_space=space))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert f"search_space.x.{reason}" in str(raised.value)


REPEATED = {
    "n_layers": {"type": "int", "low": 1, "high": 3},
    "layers": {"repeat": {"count": "n_layers", "each": {
        "units": {"type": "int", "low": 4, "high": 64, "log": True},
        "act": {"type": "categorical", "choices": ["relu", "tanh"]},
        "slope": {"type": "float", "low": 0.0, "high": 0.3, "when": {"act": "relu"}},
    }}},
}  # fmt: skip


def test_repeat_gives_cfg_a_list_of_n_layers(tmp_path: Path) -> None:
    out = tmp_path / "cfgs.jsonl"
    first = {"n_layers": 2, "layers": [{"units": 8, "act": "relu", "slope": 0.1},
                                       {"units": 16, "act": "tanh"}]}  # fmt: skip
    config = make_config(
        session="tests.sessions:echo_cfg", static={"out": str(out)}, search_space=REPEATED,
        study_={"n_trials": 25, "sampler": {"name": "random", "seed": 4}}, enqueue=[first],
    )  # fmt: skip
    study = run_hpo(sessions.echo_cfg, write_config(tmp_path / "c.yaml", config),
                    f"sqlite:///{tmp_path / 'db'}")  # fmt: skip
    cfgs = [json.loads(line) for line in out.read_text().splitlines()]
    assert cfgs[0] == {"out": str(out), **first}  # an enqueued point, given as a list
    assert study.trials[0].params["layers.1.units"] == 16  # Optuna's flat names
    assert {len(c["layers"]) for c in cfgs} == {1, 2, 3}
    for c in cfgs:
        assert len(c["layers"]) == c["n_layers"]
        for layer in c["layers"]:
            assert 4 <= layer["units"] <= 64
            assert ("slope" in layer) == (layer["act"] == "relu")  # a sibling's when


@pytest.mark.parametrize(
    ("repeat", "reason"),
    [
        ({"count": "n", "each": {"u": {"type": "int", "low": 1, "high": 2}}},
         "layers.repeat.count: unknown int parameter (defined above) 'n'"),
        ({"count": "n_layers", "max": 2, "each": {"u": {"type": "int", "low": 1, "high": 2}}},
         "layers.repeat.max: must be an integer from n_layers's high (3) to 1000, got 2"),
        ({"count": "n_layers", "each": {}}, "layers.repeat.each: must be a group of parameters"),
        ({"count": "n_layers", "each": {"u": {"type": "int", "low": 3, "high": 2}}},
         "layers.repeat.each.u"),
    ],
)  # fmt: skip
def test_repeat_mistakes_are_one_line(tmp_path: Path, repeat: dict, reason: str) -> None:
    space = {"n_layers": {"type": "int", "low": 1, "high": 3}, "layers": {"repeat": repeat}}
    path = write_config(tmp_path / "c.yaml", make_config(search_space=space))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert f"search_space.{reason}" in str(raised.value)


LISTED = {
    "hidden": {"type": "categorical", "choices": [[64, 64], [128], []]},
    "opt": {"type": "categorical",
            "choices": [{"name": "adam", "betas": [0.9, 0.99]}, {"name": "sgd"}]},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5, "when": {"hidden": [[64, 64]]}},
}  # fmt: skip


def test_list_and_mapping_choices_reach_cfg_as_lists_and_mappings(tmp_path: Path) -> None:
    # Optuna holds scalars only; such a choice is its JSON text there, the list in cfg.
    out = tmp_path / "cfgs.jsonl"
    first = {"hidden": [128], "opt": {"name": "sgd"}}
    config = make_config(
        session="tests.sessions:echo_cfg", static={"out": str(out)}, search_space=LISTED,
        study_={"n_trials": 16, "sampler": {"name": "random", "seed": 1}}, enqueue=[first],
    )  # fmt: skip
    url = f"sqlite:///{tmp_path / 'db'}"
    study = run_hpo(sessions.echo_cfg, write_config(tmp_path / "c.yaml", config), url)
    cfgs = [json.loads(line) for line in out.read_text().splitlines()]
    assert cfgs[0] == {"out": str(out), **first}  # an enqueued point gives them as they are
    assert study.trials[0].params == {"hidden": "[128]", "opt": '{"name": "sgd"}'}
    assert {json.dumps(c["hidden"]) for c in cfgs} == {"[64, 64]", "[128]", "[]"}
    assert {c["opt"]["name"] for c in cfgs} == {"adam", "sgd"}
    for c in cfgs:
        assert ("dropout" in c) == (c["hidden"] == [64, 64])  # when: names a list choice
    # what inspect shows and --best-config writes: the lists and mappings, as cfg had them
    from hpo_framework.storage.database import open_storage
    from hpo_framework.views.inspection import trial_detail

    detail = trial_detail(open_storage(url, create_schema=False), "test-study", 0)
    assert detail["cfg"] == {"out": str(out), **first} and detail["params_nested"] == first


@pytest.mark.parametrize(
    ("choices", "reason"),
    [
        ([[1, 2], [1, 2]], "choices: choices must be unique"),
        ([[1], {"a": [1, {2: "b"}]}], "choices.1.a.1.2: keys must be strings, got 2"),
        ([[1], {"a": [1, {"b": float("inf")}]}], "choices.1.a.1.b: must be a finite number"),
    ],
)  # fmt: skip
def test_list_choice_mistakes_are_one_line(tmp_path: Path, choices: list, reason: str) -> None:
    path = write_config(tmp_path / "c.yaml", make_config(search_space={
        "h": {"type": "categorical", "choices": choices}}))  # fmt: skip
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert f"search_space.h.{reason}" in str(raised.value)
    when = {**LISTED, "dropout": {**LISTED["dropout"], "when": {"hidden": [64, 64]}}}
    path = write_config(tmp_path / "w.yaml", make_config(search_space=when))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value).endswith("a list choice goes inside the list of values: [[64, 64]]")


def test_list_choices_keep_true_1_and_1_0_apart_and_refuse_what_json_cannot_hold(
    tmp_path: Path,
) -> None:
    space = {
        "arch": {"type": "categorical", "choices": [[1], [1.0], [True], "plain"]},
        "extra": {"type": "float", "low": 0.0, "high": 1.0, "when": {"arch": [[1.0]]}},
    }
    loaded = load_config(write_config(tmp_path / "c.yaml", make_config(search_space=space)))
    extra = loaded.search_space.params[1]
    assert [extra.is_active({"arch": v}) for v in ([1], [1.0], [True])] == [False, True, False]
    # an old study's value that is no choice here is no point of this space (create --from)
    assert loaded.search_space.distributions_of({"arch": "relu"}) is None
    assert loaded.search_space.distributions_of({"arch": '"plain"'}) is not None
    # a point JSON cannot hold is refused in one line, naming the choices as written
    with pytest.raises(ConfigError) as refused:
        loaded.search_space.check_point({"arch": [datetime.date(2024, 1, 1)]}, Checker("p.yaml"))
    assert str(refused.value).startswith(
        "p.yaml: arch: [datetime.date(2024, 1, 1)] is outside this parameter's range "
        "(choices [[1], [1.0], [True], 'plain'])"
    ), str(refused.value)
