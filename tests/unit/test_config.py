"""config.yaml is checked as a whole before any trial runs; every problem is one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hpo_framework import ConfigError, load_config
from tests.conftest import ROOT, make_config, run_cli, write_config


def error_of(tmp_path: Path, config: dict[str, Any] | str) -> str:
    path = write_config(tmp_path / "config.yaml", config)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    return message.replace(str(path), "config.yaml")


def space(**params: Any) -> dict[str, Any]:
    return make_config(search_space=params)


BAD_CONFIGS = [
    pytest.param(
        space(lr={"type": "float", "low": 0.0, "high": 0.1, "log": True}),
        "config.yaml: search_space.lr.low: must be > 0 when log is true, got 0.0",
        id="log-low-not-positive",
    ),
    pytest.param(
        space(lr={"type": "float", "low": 1.0, "high": 0.1}),
        "config.yaml: search_space.lr.low: must be < high, got low=1.0, high=0.1",
        id="low-above-high",
    ),
    pytest.param(
        space(n={"type": "int", "low": 3, "high": 3}),
        "config.yaml: search_space.n.low: must be < high, got low=3, high=3",
        id="low-equals-high",
    ),
    pytest.param(
        space(x={"type": "float", "low": 0.0, "high": 1.0, "step": 0.3}),
        "config.yaml: search_space.x.step: must divide high - low = 1.0 evenly, got step=0.3",
        id="step-not-dividing",
    ),
    pytest.param(
        space(n={"type": "int", "low": 0, "high": 10, "step": 3}),
        "config.yaml: search_space.n.step: must divide high - low = 10 evenly, got step=3",
        id="int-step-not-dividing",
    ),
    pytest.param(
        space(opt={"type": "categorical", "choices": []}),
        "config.yaml: search_space.opt.choices: must not be empty",
        id="empty-choices",
    ),
    pytest.param(
        space(x={"type": "float", "low": "a", "high": 1.0}),
        "config.yaml: search_space.x.low: must be a number, got 'a'",
        id="wrong-type-low",
    ),
    pytest.param(
        space(x={"type": "flaot", "low": 0, "high": 1}),
        "config.yaml: search_space.x.type: unknown value 'flaot'; did you mean 'float'?",
        id="unknown-type",
    ),
    pytest.param(
        space(x={"type": "float", "low": 0, "hihg": 1}),
        "config.yaml: search_space.x.hihg: unknown key 'hihg'; did you mean 'high'?",
        id="unknown-param-key",
    ),
    pytest.param(
        space(
            opt={"type": "categorical", "choices": ["sgd", "adam"]},
            momentum={"type": "float", "low": 0, "high": 1, "when": {"optimiser": "sgd"}},
        ),
        "config.yaml: search_space.momentum.when.optimiser: unknown parameter (when: names one "
        "defined above) 'optimiser'; expected one of: opt",
        id="when-unknown-param",
    ),
    pytest.param(
        space(
            opt={"type": "categorical", "choices": ["sgd", "adam"]},
            momentum={"type": "float", "low": 0, "high": 1, "when": {"opt": "sdg"}},
        ),
        "config.yaml: search_space.momentum.when.opt: 'sdg' is not a possible value "
        "(choices ['sgd', 'adam'])",
        id="when-unknown-value",
    ),
    pytest.param(
        make_config(studdy={"name": "x"}),
        "config.yaml: studdy: unknown key 'studdy'; did you mean 'study'?",
        id="unknown-top-key",
    ),
    pytest.param(
        make_config(study_={"n_trails": 5}),
        "config.yaml: study.n_trails: unknown key 'n_trails'; did you mean 'n_trials'?",
        id="unknown-study-key",
    ),
    pytest.param(
        make_config(study_={"n_trials": "many"}),
        "config.yaml: study.n_trials: must be an integer >= 1 or null, got 'many'",
        id="wrong-type-n-trials",
    ),
    pytest.param(
        make_config(study_={"direction": "minimise"}),
        "config.yaml: study.direction: unknown value 'minimise'; did you mean 'minimize'?",
        id="bad-direction",
    ),
    pytest.param(
        make_config(study_={"sampler": {"name": "tpee"}}),
        "config.yaml: study.sampler.name: unknown value 'tpee'; did you mean 'tpe'?",
        id="unknown-sampler",
    ),
    pytest.param(
        make_config(study_={"sampler": {"name": "tpe", "options": {"n_startup": 3}}}),
        "config.yaml: study.sampler.options.n_startup: unknown option 'n_startup'; "
        "did you mean 'n_startup_trials'?",
        id="unknown-sampler-option",
    ),
    *[
        pytest.param(
            make_config(study_={part: {"name": name, "options": options}}),
            f"config.yaml: study.{part}.options.{next(iter(options))}: {reason}",
            id=f"out-of-range-{name}-{next(iter(options))}",
        )
        for part, name, options, reason in [
            ("sampler", "tpe", {"n_ei_candidates": -5}, "must be >= 1, got -5"),
            ("sampler", "tpe", {"n_startup_trials": -1}, "must be >= 0, got -1"),
            ("sampler", "tpe", {"prior_weight": 0.0}, "must be > 0, got 0.0"),
            ("sampler", "gp", {"n_startup_trials": -3}, "must be >= 0, got -3"),
            ("pruner", "hyperband", {"reduction_factor": 1}, "must be >= 2, got 1"),
            ("pruner", "hyperband", {"bootstrap_count": -1}, "must be >= 0, got -1"),
        ]
    ],
    pytest.param(
        make_config(
            study_={
                "pruner": {"name": "hyperband", "options": {"min_resource": 9, "max_resource": 3}}
            }
        ),
        "config.yaml: study.pruner.options.max_resource: must be >= min_resource (9), got 3",
        id="hyperband-resources-upside-down",
    ),
    pytest.param(
        make_config(study_={"pruner": {"name": "medain"}}),
        "config.yaml: study.pruner.name: unknown value 'medain'; did you mean 'median'?",
        id="unknown-pruner",
    ),
    pytest.param(
        make_config(study_={"pruner": {"name": "median", "options": {"warmup": 2}}}),
        "config.yaml: study.pruner.options.warmup: unknown option 'warmup'; "
        "did you mean 'n_warmup_steps'?",
        id="unknown-pruner-option",
    ),
    pytest.param(
        make_config(study_={"pruner": {"name": "percentile", "options": {"percentile": 150}}}),
        "config.yaml: study.pruner.options: Percentile must be between 0 and 100 inclusive, "
        "but got percentile=150.",
        id="bad-pruner-option-value",
    ),
    pytest.param(
        make_config(
            study_={
                "direction": None,
                "directions": ["minimize", "maximize"],
                "pruner": {"name": "median"},
            }
        ),
        "config.yaml: study.pruner.name: Optuna cannot prune multi-objective studies; use 'none'",
        id="pruner-with-two-directions",
    ),
    pytest.param(
        make_config(session="tests.sessions.quadratic"),
        "config.yaml: session: must look like 'package.module:function', "
        "got 'tests.sessions.quadratic'",
        id="session-ref-syntax",
    ),
    pytest.param(
        make_config(static={"x": 1}),
        "config.yaml: search_space.x: is also set under static:; a parameter is either static "
        "or searched",
        id="static-and-searched",
    ),
    pytest.param(
        make_config(enqueue=[{"y": 1.0}]),
        "config.yaml: enqueue.0.y: unknown key 'y'; expected one of: x (a parameter the "
        "session asks for itself can be enqueued with hpo-coordinator enqueue once a trial "
        "has asked for it)",
        id="enqueue-unknown-param",
    ),
    pytest.param(
        make_config(enqueue=[{"x": 50.0}]),
        "config.yaml: enqueue.0.x: 50.0 is outside this parameter's range (-5.0..5.0)",
        id="enqueue-out-of-range",
    ),
    pytest.param(
        make_config(study_={"grace_period": 1, "heartbeat_interval": 2}),
        "config.yaml: study.grace_period: must be longer than heartbeat_interval (2.0), got 1.0",
        id="grace-shorter-than-heartbeat",
    ),
    pytest.param(
        make_config(study_={"sampler": {"name": "grid"}}),
        "config.yaml: search_space.x: the grid sampler needs a finite set: give a step, no log",
        id="grid-without-step",
    ),
    pytest.param(
        "study: {name: x}\nsearch_space:\n  x: {type: float, low: 0, high: [1\n",
        "config.yaml: line 4: YAML syntax error: expected ',' or ']', but got '<stream end>'",
        id="yaml-syntax",
    ),
    pytest.param(
        "- just\n- a list\n",
        "config.yaml: must be a mapping, got a list",
        id="not-a-mapping",
    ),
    pytest.param(
        "", "config.yaml: the file is empty; it needs at least 'study:' with a 'name'", id="empty"
    ),
    pytest.param(
        "study: {name: x}\nstatic: {when: 2024-01-01}\n",
        "config.yaml: static.when: unsupported value datetime.date(2024, 1, 1); "
        "quote it to make it a string",
        id="date-value",
    ),
    pytest.param(
        "study: {name: x}\nstatic: !!python/object/apply:os.system [echo pwned]\n",
        "config.yaml: line 2: YAML syntax error: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'",
        id="python-tag",
    ),
    pytest.param(
        make_config(checkpoints={"dir": "/c", "s3": "s3://b"}),
        "config.yaml: checkpoints: give either 'dir' (a shared directory) or 's3' "
        "(s3://bucket/prefix)",
        id="checkpoints-dir-and-s3",
    ),
    pytest.param(
        make_config(checkpoints={"s3": "bucket/prefix"}),
        "config.yaml: checkpoints.s3: must be s3://bucket or s3://bucket/prefix, "
        "got 'bucket/prefix'",
        id="checkpoints-s3-not-a-url",
    ),
    pytest.param(
        make_config(checkpoints={"dir": "/c", "endpoint_url": "http://minio:9000"}),
        "config.yaml: checkpoints.endpoint_url: is for 's3' checkpoints only",
        id="checkpoints-endpoint-without-s3",
    ),
    pytest.param(
        make_config(checkpoints={"s3": "s3://b/p", "endpoint_url": "minio:9000"}),
        "config.yaml: checkpoints.endpoint_url: must be an http:// or https:// URL, "
        "got 'minio:9000'",
        id="checkpoints-endpoint-not-http",
    ),
]


@pytest.mark.parametrize(("config", "message"), BAD_CONFIGS)
def test_bad_config_is_one_line_naming_file_key_and_reason(
    tmp_path: Path, config: Any, message: str
) -> None:
    assert error_of(tmp_path, config) == message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.yaml: file not found$"):
        load_config(tmp_path / "nope.yaml")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"study: {name: \xff\xfe}\n")
    with pytest.raises(ConfigError, match=r"config.yaml: not valid UTF-8 \(byte 14\)$"):
        load_config(path)


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ["study: {name: x}", "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 10)}]")
    assert error_of(tmp_path, "\n".join(lines) + "\n") == (
        "config.yaml: holds more than 100000 values (YAML aliases?)"
    )


def test_the_shipped_config_is_valid_and_nested() -> None:
    config = load_config(ROOT / "config.yaml")
    assert config.study.name == "linear-regression"
    assert config.session == "experiments.linear_regression:single_session"
    assert config.static["data"]["n_features"] == 10
    assert "model.hidden" in config.search_space
    assert config.search_space.params[3].when == {"optimizer": ("sgd",)}
    assert config.enqueue[0] == {
        "lr": 0.01,
        "batch_size": 32,
        "optimizer": "adam",
        "model.hidden": 0,
    }


def test_defaults_fill_what_the_file_leaves_out(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.yaml", "study: {name: minimal}\n"))
    s = config.study
    assert (s.directions, s.n_trials, s.timeout, s.max_failed_trials) == (
        ("minimize",),
        50,
        None,
        10,
    )
    assert (s.sampler.name, s.pruner.name, s.max_retries) == ("tpe", "none", 2)
    assert (s.heartbeat_interval, s.grace_period) == (5.0, 20.0)


def test_config_hash_ignores_key_order_and_formatting(tmp_path: Path) -> None:
    a = load_config(write_config(tmp_path / "a.yaml", "study: {name: x, n_trials: 3}\n"))
    b = load_config(write_config(tmp_path / "b.yaml", "study:\n  n_trials: 3\n  name: x\n"))
    c = load_config(write_config(tmp_path / "c.yaml", "study: {name: x, n_trials: 4}\n"))
    assert a.hash == b.hash != c.hash


def test_cli_reports_bad_config_in_one_line_with_exit_2(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "config.yaml", space(lr={"type": "float", "low": 0, "high": 1, "log": True})
    )
    result = run_cli("hpo-coordinator", "create", str(path), url=f"sqlite:///{tmp_path / 'x.db'}")
    assert result.returncode == 2
    assert (
        result.stderr
        == f"Error: {path}: search_space.lr.low: must be > 0 when log is true, got 0\n"
    )
    assert not (tmp_path / "x.db").exists()  # nothing was created for a bad config


def test_a_yaml_11_exponent_read_as_text_gets_a_hint(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.yaml",
        "study: {name: s}\nsearch_space:\n  lr: {type: float, low: 1e-5, high: 1.0e-1}\n",
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f"{path}: search_space.lr.low: must be a number, got '1e-5' "
        "(YAML reads 1e-5 as text; write 1.0e-5)"
    )
