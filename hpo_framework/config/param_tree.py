"""Parameter names and nesting, without Optuna: the dotted names Optuna holds (``model.hidden``),
the nested ``cfg`` a session gets, and what a study's stored ``search_space:`` says of a name.

``param_sampler`` builds the search space with Optuna's distributions to sample it; the read side
(``hpo-inspect``) only needs to put a trial's parameters back as its session got them, which
:class:`StoredSpace` does from the stored config alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"hidden": 16}}`` -> ``{"model.hidden": 16}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"model.hidden": 16}`` -> ``{"model": {"hidden": 16}}``; a group whose keys are
    ``0, 1, ...`` (a ``repeat:``) becomes a list: ``{"layers.0.units": 8}`` ->
    ``{"layers": [{"units": 8}]}``."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    nested = _lists(tree)  # a dict: top-level names are never numbers
    return nested if isinstance(nested, dict) else {"": nested}


def _lists(tree: dict[str, Any]) -> Any:
    out = {k: _lists(v) if isinstance(v, dict) else v for k, v in tree.items()}
    if out and all(k.isdigit() for k in out):
        return [out[k] for k in sorted(out, key=int)]
    return out


def encode_choice(value: Any) -> str:
    """A list- or mapping-valued choice as Optuna holds it: its JSON text, keys sorted."""
    return json.dumps(value, sort_keys=True)


def merge(static: Mapping[str, Any], sampled: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge sampled values over the static ones: the ``cfg`` a session receives."""
    merged = dict(static)
    for key, value in sampled.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class StoredSpace:
    """A study's stored config as far as reading its trials needs it: its ``static:`` values,
    the names its ``search_space:`` searches, and the parameters whose list or mapping choices
    Optuna holds as JSON text. It reads what the coordinator checked and stored, tolerating
    anything else (what it cannot place stays as Optuna holds it); ``SearchSpace`` of a parsed
    config answers the same (``tests/unit/test_param_tree.py`` compares the two)."""

    def __init__(self, raw: Any) -> None:
        raw = raw if isinstance(raw, Mapping) else {}
        static, space = raw.get("static"), raw.get("search_space")
        self.static: Mapping[str, Any] = static if isinstance(static, Mapping) else {}
        self._tree: Mapping[str, Any] = space if isinstance(space, Mapping) else {}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._param(name) is not None

    def decode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """A trial's parameters as the session got them (``SearchSpace.decode``)."""
        return {k: self._decode(k, v) for k, v in params.items()}

    def _decode(self, name: str, value: Any) -> Any:
        spec = self._param(name)
        choices = spec.get("choices") if spec is not None else None
        if spec is None or spec.get("type") != "categorical" or not isinstance(choices, list):
            return value
        if not any(isinstance(c, (list, Mapping)) for c in choices):
            return value
        texts = {encode_choice(c) for c in choices}
        return json.loads(value) if isinstance(value, str) and value in texts else value

    def _param(self, name: str, seen: frozenset[int] = frozenset()) -> Mapping[str, Any] | None:
        """The spec of parameter ``name`` (``layers.2.units`` inside a ``repeat:``), or None."""
        node: Any = self._tree
        parts = name.split(".")
        i = 0
        while i < len(parts):
            if not isinstance(node, Mapping) or "type" in node:
                return None
            repeat = node.get("repeat") if i > 0 else None
            if isinstance(repeat, Mapping):  # layers.<index>.rest: the group `each`, per layer
                if not parts[i].isdigit() or int(parts[i]) >= self._layers(repeat, seen):
                    return None
                node = repeat.get("each")
            else:
                node = node.get(parts[i])
            i += 1
        return node if isinstance(node, Mapping) and "type" in node else None

    def _layers(self, repeat: Mapping[str, Any], seen: frozenset[int]) -> int:
        """How many layers a ``repeat:`` has: its ``max``, else its count parameter's high (a
        top-level name, or inside an outer ``repeat:`` the path as written there)."""
        most = repeat.get("max")
        count = repeat.get("count")
        if most is None and isinstance(count, str) and id(repeat) not in seen:
            spec = self._param(count, seen | {id(repeat)}) or self._written(count)
            most = spec.get("high") if spec is not None else None
        return most if isinstance(most, int) and not isinstance(most, bool) else 0

    def _written(self, path: str) -> Mapping[str, Any] | None:
        """The parameter at ``path`` read key by key (``layers.repeat.each.n``)."""
        node: Any = self._tree
        for part in path.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return node if isinstance(node, Mapping) and "type" in node else None
