"""Malformed and adversarial input is refused with one line, never a traceback or code run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

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


def test_nan_bounds_are_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("study: {name: x}\nsearch_space: {x: {type: float, low: .nan, high: 1}}\n")
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e) == f"{path}: search_space.x.low: must be a finite number, got nan"
    else:
        raise AssertionError("NaN bound accepted")
