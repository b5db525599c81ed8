"""``StoredSpace`` (the read side's view of a stored config, no Optuna) answers what the parsed
``SearchSpace`` answers: which names are searched, and each value as the session got it."""

from __future__ import annotations

from hpo_framework.config.param_tree import StoredSpace, encode_choice
from hpo_framework.config.schema import Config
from tests.conftest import make_config

SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
    "repeat": {"type": "categorical", "choices": ["a", "b"]},  # a top-level name, not a repeat:
    "model": {
        "shape": {"type": "categorical", "choices": [[8, 8], [16], {"a": 1}]},
        "act": {"type": "categorical", "choices": ["[1]", "relu"]},  # JSON-like text stays text
    },
    "n_layers": {"type": "int", "low": 1, "high": 3},
    "layers": {"repeat": {"count": "n_layers", "max": 4, "each": {
        "units": {"type": "int", "low": 4, "high": 64},
        "kind": {"type": "categorical", "choices": [["conv", 3], ["pool"]]},
    }}},
    "blocks": {"repeat": {"count": "n_layers", "each": {  # no max: n_layers's high, 3
        "width": {"type": "categorical", "choices": [{"w": 1}, {"w": 2}]},
    }}},
    "stages": {"repeat": {"count": "n_layers", "max": 4, "each": {  # a repeat in a repeat
        "n": {"type": "int", "low": 1, "high": 2},
        "cells": {"repeat": {"count": "stages.repeat.each.n", "each": {
            "op": {"type": "categorical", "choices": [["a"], ["b"]]},
        }}},
    }}},
}  # fmt: skip

NAMES = [
    "lr", "repeat", "model.shape", "model.act", "model", "model.shape.0", "n_layers",
    "layers.0.units", "layers.3.kind", "layers.4.units", "layers.x.units", "layers.0",
    "blocks.2.width", "blocks.3.width", "asked_by_session", "", "lr.x",
    "stages.3.n", "stages.1.cells.1.op", "stages.1.cells.2.op", "stages.4.n",
]  # fmt: skip


def test_stored_space_knows_the_searched_names_as_the_parsed_space_does() -> None:
    parsed = Config.from_mapping(make_config(search_space=SPACE), "c.yaml").search_space
    stored = StoredSpace(make_config(search_space=SPACE))
    for name in NAMES:
        assert (name in stored) == (name in parsed), name


def test_stored_space_decodes_as_the_parsed_space_does() -> None:
    raw = make_config(search_space=SPACE, static={"epochs": 3})
    parsed = Config.from_mapping(raw, "c.yaml").search_space
    stored = StoredSpace(raw)
    params = {
        "lr": 0.1, "repeat": "a", "model.shape": encode_choice({"a": 1}), "model.act": "[1]",
        "layers.0.kind": encode_choice(["conv", 3]), "layers.3.kind": '["other"]',
        "blocks.1.width": encode_choice({"w": 2}), "suggested": "[2]",
        "stages.0.cells.1.op": encode_choice(["b"]),
    }  # fmt: skip
    assert stored.decode(params) == parsed.decode(params)
    assert stored.decode(params)["model.shape"] == {"a": 1}
    assert stored.decode(params)["model.act"] == "[1]"
    assert stored.static == {"epochs": 3}


def test_stored_space_tolerates_what_no_coordinator_stored() -> None:
    loop = {"a": {"repeat": {"count": "a.0.b", "each": {"b": {"type": "int", "high": 3}}}}}
    for raw in (None, [], {"search_space": [1]}, {"search_space": {"a": {"repeat": 3}}},
                {"static": "x", "search_space": {"a": {"b": None}}},
                {"search_space": loop}):  # fmt: skip
        stored = StoredSpace(raw)
        assert "a.0.b" not in stored and stored.decode({"a": "[1]"}) == {"a": "[1]"}
        assert stored.static == {}
