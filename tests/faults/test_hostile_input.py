"""Malformed and adversarial input is refused with one line, never a traceback or code run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpo_framework import ConfigError, load_config
from tests.conftest import make_config

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
KEYS = ["type", "low", "high", "log", "step", "choices", "when", "name", "direction", "n_trials"]


@st.composite
def mutated_configs(draw: st.DrawFn) -> Any:
    """A valid config with one value somewhere replaced by something arbitrary."""
    config = make_config(
        search_space={
            "lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
            "opt": {"type": "categorical", "choices": ["sgd", "adam"]},
            "m": {"type": "float", "low": 0.0, "high": 1.0, "when": {"opt": "sgd"}},
            "n": {"type": "int", "low": 0, "high": 64, "step": 16},
        },
        enqueue=[{"lr": 0.01, "opt": "adam"}],
    )
    node = config
    path = draw(
        st.lists(
            st.sampled_from(
                ["study", "search_space", "lr", "opt", "m", "n", "sampler", "enqueue"] + KEYS
            ),
            max_size=4,
        )
    )
    for key in path:
        if isinstance(node, dict) and key in node and isinstance(node[key], (dict, list)):
            node = node[key]
    if isinstance(node, dict):
        node[draw(st.sampled_from(KEYS + ["x", "extra"]))] = draw(values)
    elif isinstance(node, list) and node:
        node[0] = draw(values)
    return config


def check_refused_or_valid(tmp_path: Path, text: str | bytes) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    started = time.monotonic()
    try:
        load_config(path)
    except ConfigError as e:
        message = str(e)
        assert message.startswith(f"{path}: ") and "\n" not in message
    assert time.monotonic() - started < 1.0


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(config=mutated_configs())
def test_mutated_configs_are_refused_in_one_line_or_accepted(tmp_path: Path, config: Any) -> None:
    try:
        text = yaml.safe_dump(config, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return
    check_refused_or_valid(tmp_path, text)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_loader(tmp_path: Path, data: bytes) -> None:
    check_refused_or_valid(tmp_path, b"study: {name: x}\n" + data)


ADVERSARIAL = [
    "study: {name: x, n_trials: 1e400}\n",
    "study: {name: x}\nsearch_space: {x: {type: float, low: .nan, high: 1}}\n",
    "study: {name: x}\nsearch_space: {x: {type: float, low: -.inf, high: .inf}}\n",
    "study: {name: x}\nsearch_space: {x: {type: int, low: 0, high: 100000000000000000000000}}\n",
    "study: {name: x}\nstatic: " + "[" * 200 + "]" * 200 + "\n",
    "study: {name: x}\nstatic: !!python/name:os.system\n",
    "study: {name: x}\nstatic: !!binary aGVsbG8=\n",
    "study: {name: x}\nstatic: {? [a, b] : c}\n",
    "study: {name: x}\nstatic: &a {b: *a}\n",
    'study: {name: "x\'; DROP TABLE trials; --"}\n',
]


def test_adversarial_configs(tmp_path: Path) -> None:
    for text in ADVERSARIAL:
        check_refused_or_valid(tmp_path, text)


MISTAKES = {
    "duplicate key": (
        "study:\n  name: x\n  n_trials: 5\n  n_trials: 5000\n",
        "line 4: YAML syntax error: key 'n_trials' is given twice in one mapping",
    ),
    "integer of 5000 digits": (
        "study: {name: x, n_trials: " + "9" * 5000 + "}\n",
        "YAML value out of range: Exceeds the limit (4300 digits) for integer string conversion",
    ),
    "integer of 300 digits": (
        "study: {name: x}\nstatic: {a: " + "9" * 300 + "}\n",
        "static.a: integer out of range (at most 19 digits), got 999999999999999999999999...",
    ),
    "NUL in the name": (
        'study: {name: "a\\0b"}\n',
        "study.name: must not hold control characters, got 'a\\x00b'",
    ),
    "ANSI in the name": (
        'study: {name: "a\\e[31mb"}\n',
        "study.name: must not hold control characters, got 'a\\x1b[31mb'",
    ),
    "newline in a parameter": (
        'study: {name: x}\nsearch_space: {"a\\nb": {type: float, low: 0, high: 1}}\n',
        "search_space: key 'a\\nb' holds control characters",
    ),
    "heartbeat of 1 ms": (
        "study: {name: x, heartbeat_interval: 0.001}\n",
        "study.heartbeat_interval: must be at least 0.5 s (each running trial writes to the "
        "database this often), got 0.001",
    ),
    "when: an empty list": (
        "study: {name: x}\nsearch_space:\n  a: {type: categorical, choices: [p, q]}\n"
        "  b: {type: float, low: 0, high: 1, when: {a: []}}\n",
        "search_space.b.when.a: an empty list matches no value: give the values that enable "
        "this parameter",
    ),
    "1 and true": (
        "study: {name: x}\nsearch_space: {a: {type: categorical, choices: [1, true]}}\n",
        "search_space.a.choices: bool and int choices equal to 1 cannot be told apart "
        "(YAML true == 1 == 1.0); quote one to make it a string",
    ),
    "sampler option of the wrong type": (
        "study: {name: x, sampler: {name: tpe, options: {n_startup_trials: ten}}}\n",
        "study.sampler.options.n_startup_trials: must be int, got 'ten'",
    ),
    "a function as a string": (
        "study: {name: x, sampler: {name: tpe, options: {gamma: 'lambda n: 1'}}}\n",
        "study.sampler.options.gamma: takes a Python function, which config.yaml cannot hold; "
        "leave it out",
    ),
    "a grid of a billion points": (
        "study: {name: x, sampler: grid}\n"
        "search_space: {a: {type: int, low: 0, high: 1000000000}}\n",
        "study.sampler.name: the search space has 1e+09 grid points and the grid sampler lists "
        "them all in memory: at most 100000 (use a coarser step, fewer choices or another "
        "sampler)",
    ),
    "static replaced by a group": (
        "study: {name: x}\nstatic: {model: 3}\n"
        "search_space: {model: {hidden: {type: int, low: 1, high: 4}}}\n",
        "static.model: overlaps the searched parameter 'model.hidden': one would replace the "
        "other in cfg; rename one of them",
    ),
    "a parameter name wider than Optuna's column": (
        "study: {name: x}\nsearch_space: {" + "p" * 600 + ": {type: float, low: 0, high: 1}}\n",
        f"search_space.{'p' * 600}: the parameter's name is 600 characters; at most 512",
    ),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_mistakes_create_used_to_accept_are_refused_in_one_line(tmp_path: Path, case: str) -> None:
    text, expected = MISTAKES[case]
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value).startswith(f"{path}: {expected}")
    assert "\n" not in str(refused.value)


names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40
)
numbers = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=names, number=numbers, key=names)
def test_generated_names_and_numbers_are_refused_in_one_line_or_accepted(
    tmp_path: Path, name: str, number: Any, key: str
) -> None:
    config = make_config(
        static={key: number},
        search_space={key + "_p": {"type": "float", "low": 0.0, "high": 1.0}},
    )
    config["study"].update({"name": name, "n_trials": number})
    try:
        text = yaml.safe_dump(config, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return
    check_refused_or_valid(tmp_path, text)


def test_nan_bounds_are_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("study: {name: x}\nsearch_space: {x: {type: float, low: .nan, high: 1}}\n")
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e) == f"{path}: search_space.x.low: must be a finite number, got nan"
    else:
        raise AssertionError("NaN bound accepted")


def test_trial_timeout_fails_a_hanging_trial_and_the_study_goes_on(tmp_path: Path) -> None:
    from hpo_framework import run_hpo
    from tests import sessions

    config = make_config(
        session="tests.sessions:sleepy",
        static={"sleep_s": 30},
        study_={"n_trials": 3, "trial_timeout": 0.5, "max_failed_trials": 2},
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.monotonic()
    study = run_hpo(sessions.sleepy, path, f"sqlite:///{tmp_path / 'db'}")
    assert time.monotonic() - started < 10
    assert [t.user_attrs["error"] for t in study.trials] == ["trial_timeout of 0.5s exceeded"] * 2


def test_a_session_deaf_to_signals_is_killed_at_its_timeout_and_retried(
    sqlite_url: str, tmp_path: Path
) -> None:
    """SIGTERM and SIGALRM blocked: the supervisor kills the executor (SIGKILL after the
    grace) and the same worker goes on with the retry."""
    from tests.conftest import start_worker
    from tests.pool_helpers import create, trials

    name = create(
        tmp_path, sqlite_url, session="tests.sessions:hangs_first_time_ignoring_signals",
        static={"dir": str(tmp_path)},
        study_={"n_trials": 2, "trial_timeout": 1, "heartbeat_interval": 1, "grace_period": 2},
    )  # fmt: skip
    worker = start_worker("--idle-exit", "2", url=sqlite_url, log=tmp_path / "w.log")
    assert worker.wait(timeout=120) == 0
    result = trials(sqlite_url, name)
    assert sorted(t.state.name for t in result) == ["COMPLETE", "COMPLETE", "FAIL"]
    [failed] = [t for t in result if t.state.name == "FAIL"]
    assert failed.user_attrs["error"] == "trial_timeout of 1s exceeded"
    assert any(t.user_attrs.get("retry_of") == failed.number for t in result)
    assert len({t.user_attrs["worker"] for t in result}) == 1


def test_a_session_printing_megabytes_does_not_hurt_the_worker(
    sqlite_url: str, tmp_path: Path
) -> None:
    from tests.conftest import start_worker
    from tests.pool_helpers import counts, create

    name = create(
        tmp_path, sqlite_url, session="tests.sessions:prints_megabytes", study_={"n_trials": 2}
    )
    worker = start_worker("--idle-exit", "1", url=sqlite_url, log=tmp_path / "w.log")
    assert worker.wait(timeout=60) == 0
    assert counts(sqlite_url, name) == {"COMPLETE": 2}


def test_study_names_with_quotes_sql_and_unicode_are_plain_data(
    sqlite_url: str, tmp_path: Path
) -> None:
    from tests.conftest import run_cli, start_worker, write_config

    path = write_config(tmp_path / "c.yaml", make_config(study_={"n_trials": 2}))
    names = ["x'; DROP TABLE trials; --", '실험 "β" %s {0}']
    for name in names:
        result = run_cli("hpo-coordinator", "create", str(path), "--name", name, url=sqlite_url)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1] == name
    assert start_worker("--idle-exit", "1", url=sqlite_url).wait(timeout=60) == 0
    for name in names:
        summary = run_cli("hpo-inspect", name, "--format", "json", url=sqlite_url)
        assert json.loads(summary.stdout)["counts"]["COMPLETE"] == 2
    listing = run_cli("hpo-inspect", "--format", "json", url=sqlite_url)
    assert {row["study"] for row in json.loads(listing.stdout)} == set(names)
