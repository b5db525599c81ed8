"""The YAML search space: parsed and checked once, then sampled for every trial.

A search space is a tree. A mapping with a ``type`` key is a parameter; any other mapping is a
group whose keys nest in ``cfg``. Inside Optuna a parameter's name is its dotted path
(``model.hidden``), which is also how ``when:`` and ``enqueue:`` name it.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from hpo_framework._checks import (
    Checker,
    describe,
    did_you_mean,
    is_number,
    is_scalar,
)
from hpo_framework.config.param_tree import encode_choice, unflatten

_KEYS = {
    "float": {"type", "low", "high", "log", "step", "when"},
    "int": {"type", "low", "high", "log", "step", "when"},
    "categorical": {"type", "choices", "when"},
}


@dataclass(frozen=True)
class Param:
    """One searched parameter: its dotted name, Optuna distribution and activation rule."""

    name: str
    distribution: BaseDistribution
    #: Other parameters' names and what activates this one (all must match): the values it
    #: may take, or comparisons (``{">=": 2}``).
    when: Mapping[str, Rule]
    #: Its choices are lists or mappings (``[[64, 64], [128]]``), which Optuna cannot hold:
    #: Optuna sees each as its JSON text, the session gets the list or mapping back.
    encoded: bool = False

    def to_optuna(self, value: Any) -> Any:
        return encode_choice(value) if self.encoded else value

    def from_optuna(self, value: Any) -> Any:
        """A value as Optuna holds it, as the session gets it (a value that is not one of this
        parameter's choices, e.g. an old study's, stays as it is)."""
        d = self.distribution
        if self.encoded and isinstance(d, CategoricalDistribution) and value in d.choices:
            return json.loads(value)
        return value

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.name.split("."))

    def is_active(self, values: Mapping[str, Any]) -> bool:
        return all(
            name in values
            and (
                rule.holds(values[name])
                if isinstance(rule, (Compare, OneOfEncoded))
                else values[name] in rule
            )
            for name, rule in self.when.items()
        )


_COMPARE = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "!=": operator.ne,
}  # fmt: skip


@dataclass(frozen=True)
class Compare:
    """``when: {n_layers: {">=": 2}}``: comparisons that must all hold."""

    ops: tuple[tuple[str, Any], ...]

    def holds(self, value: Any) -> bool:
        return all(_COMPARE[op](value, bound) for op, bound in self.ops)


@dataclass(frozen=True)
class OneOfEncoded:
    """``when: {hidden: [[64, 64]]}`` on a parameter with list or mapping choices: compared
    as JSON text, so that ``[1]``, ``[1.0]`` and ``[true]`` stay apart as Optuna keeps them."""

    texts: frozenset[str]

    def holds(self, value: Any) -> bool:
        try:
            return encode_choice(value) in self.texts
        except (TypeError, ValueError):
            return False


#: What ``when:`` says of one parameter: the values it may take, or comparisons.
Rule = tuple[Any, ...] | Compare | OneOfEncoded


class SearchSpace:
    """The parameters of ``search_space:``, in the order they are sampled."""

    def __init__(self, params: list[Param]) -> None:
        self.params = tuple(params)
        self._by_name = {p.name: p for p in params}

    def __len__(self) -> int:
        return len(self.params)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    @classmethod
    def parse(cls, tree: Any, check: Checker) -> SearchSpace:
        """Check ``search_space:`` (at ``check``'s key path) and build its parameters."""
        params: list[Param] = []
        if tree is None:
            return cls(params)
        check.mapping(tree)
        _parse_group(tree, check, params)
        return cls(params)

    def decode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """A trial's parameters as the session got them: list- and mapping-valued choices back
        from the JSON text Optuna holds (the others, and unknown names, as they are)."""
        by_name = self._by_name
        return {k: by_name[k].from_optuna(v) if k in by_name else v for k, v in params.items()}

    def distributions_of(self, point: Mapping[str, Any]) -> dict[str, BaseDistribution] | None:
        """The distributions of ``point`` (flat names, values as Optuna holds them) if this
        space could have sampled it: every parameter active for it present with a possible
        value, and nothing else."""
        active: dict[str, BaseDistribution] = {}
        decoded = self.decode(point)
        for p in self.params:
            if p.is_active(decoded):
                if p.name not in point or not _contains(p.distribution, point[p.name]):
                    return None
                active[p.name] = p.distribution
        return active if set(active) == set(point) else None

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """Suggest every active parameter on ``trial``; returns them as a nested dict."""
        flat: dict[str, Any] = {}
        for p in self.params:
            if p.is_active(flat):
                flat[p.name] = p.from_optuna(_suggest(trial, p.name, p.distribution))
        return unflatten(flat)

    def grid(self, check: Checker) -> dict[str, list[Any]]:
        """Every parameter's finite list of values, for the grid sampler (``check``: file root)."""
        grid: dict[str, list[Any]] = {}
        points = 1
        for p in self.params:  # counted before any list is built: a grid may not fit in memory
            points *= _grid_size(p.distribution) or 1
        if points > MAX_GRID_POINTS:
            check.at("study", "sampler", "name").fail(
                f"the search space has {points:.3g} grid points and the grid sampler lists them "
                f"all in memory: at most {MAX_GRID_POINTS} (use a coarser step, fewer choices "
                "or another sampler)"
            )
        for p in self.params:
            d = p.distribution
            if isinstance(d, CategoricalDistribution):
                grid[p.name] = list(d.choices)
            elif isinstance(d, IntDistribution) and not d.log:
                grid[p.name] = list(range(d.low, d.high + 1, d.step))
            elif isinstance(d, FloatDistribution) and d.step is not None:
                n = round((d.high - d.low) / d.step)
                grid[p.name] = [d.low + i * d.step for i in range(n + 1)]
            else:
                check.at("search_space", *p.path).fail(
                    "the grid sampler needs a finite set: give a step, no log"
                )
        return grid

    def check_point(
        self, point: Any, check: Checker, asked: Mapping[str, BaseDistribution] | None = None
    ) -> dict[str, Any]:
        """Check one enqueued point (nested, like ``cfg``); return it flat for Optuna.

        ``asked``: the parameters the study's session has asked for itself (``trial().suggest_*``,
        as its trials recorded them), which a point may give too; Optuna hands the value to the
        session's ``suggest`` call (its ``enqueue_trial``'s fixed parameters)."""
        check.mapping(point)
        encoded = {p.name for p in self.params if p.encoded}
        flat = _flatten_point(_indexed(point, encoded), encoded)
        asked = asked or {}
        for name, value in flat.items():
            at = check.at(*name.split("."))
            if name in self._by_name:
                param = self._by_name[name]
                d, shown = param.distribution, _range(param.distribution, param.encoded)
                given = repr(value) if isinstance(value, (list, Mapping)) else describe(value)
                if param.encoded and not _plain_data(value):
                    at.fail(f"{given} is outside this parameter's range ({shown})")
                flat[name] = param.to_optuna(value)
                if not _contains(d, flat[name]):
                    at.fail(f"{given} is outside this parameter's range ({shown})")
                continue
            elif name in asked:
                d = asked[name]
            else:
                hint = "" if asked else (
                    " (a parameter the session asks for itself can be enqueued with "
                    "hpo-coordinator enqueue once a trial has asked for it)"
                )  # fmt: skip
                key = name.split(".")[-1]
                known = [*self._sibling_names(name), *asked]
                at.fail(f"unknown key '{key}'{did_you_mean(key, known)}{hint}")
            if not _contains(d, value):
                at.fail(f"{describe(value)} is outside this parameter's range ({_range(d)})")
        return flat

    def _sibling_names(self, name: str) -> list[str]:
        prefix = name.rsplit(".", 1)[0] + "." if "." in name else ""
        return [n[len(prefix) :].split(".")[0] for n in self._by_name if n.startswith(prefix)]


#: The most points the grid sampler may enumerate.
MAX_GRID_POINTS = 100_000
#: The longest dotted parameter name Optuna's tables hold.
MAX_PARAM_NAME = 512


def _grid_size(d: BaseDistribution) -> int | None:
    if isinstance(d, CategoricalDistribution):
        return len(d.choices)
    if isinstance(d, IntDistribution) and not d.log:
        return (d.high - d.low) // d.step + 1
    if isinstance(d, FloatDistribution) and d.step is not None:
        return round((d.high - d.low) / d.step) + 1
    return None


def _indexed(point: Any, keep: frozenset[str] | set[str] = frozenset(), at: str = "") -> Any:
    """The inverse for enqueued points: a list of groups becomes ``{"0": ..., "1": ...}``
    (except the value of a parameter in ``keep``, whose choices are lists or mappings)."""
    if at.rstrip(".") in keep:
        return point
    if isinstance(point, list) and all(isinstance(x, Mapping) for x in point):
        return {str(i): _indexed(x, keep, f"{at}{i}.") for i, x in enumerate(point)}
    if isinstance(point, Mapping):
        return {k: _indexed(v, keep, f"{at}{k}.") for k, v in point.items()}
    return point


def _flatten_point(tree: Mapping[str, Any], keep: set[str], prefix: str = "") -> dict[str, Any]:
    """``flatten``, stopping at the parameters in ``keep`` (their values are mappings)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and name not in keep:
            flat.update(_flatten_point(value, keep, name + "."))
        else:
            flat[name] = value
    return flat


def _parse_group(
    tree: Mapping[str, Any],
    check: Checker,
    params: list[Param],
    outer: Sequence[Param] = (),
) -> None:
    """Parse a group into ``params``; ``when:`` may also name the ``outer`` parameters."""
    for key, node in tree.items():
        at = check.at(key)
        if not isinstance(key, str) or not key or "." in key or key.isdigit():
            at.fail("parameter names must be non-empty strings without dots, not numbers")
        if isinstance(node, Mapping) and "type" in node:
            params.append(_parse_param(node, at, [*outer, *params]))
        elif isinstance(node, Mapping) and "repeat" in node:
            _parse_repeat(node, at, params)
        elif isinstance(node, Mapping) and node:
            _parse_group(node, at, params, outer)
        else:
            at.fail(
                "expected a parameter (a mapping with 'type: float|int|categorical') "
                f"or a group of parameters, got {describe(node)}"
            )


def _parse_repeat(node: Mapping[str, Any], check: Checker, params: list[Param]) -> None:
    """``layers: {repeat: {count: n_layers, max: 4, each: {...}}}``: the group ``each`` once
    per layer, as ``layers.0.units``, ``layers.1.units``... (layer i exists when
    ``n_layers > i``), which ``cfg`` receives as the list ``layers``."""
    check.known_keys(node, ("repeat",))
    at = check.at("repeat")
    spec = node["repeat"]
    at.mapping(spec)
    at.known_keys(spec, ("count", "max", "each"))
    ints = {p.name: p for p in params if isinstance(p.distribution, IntDistribution)}
    count = spec.get("count")
    if not isinstance(count, str) or count not in ints:
        at.at("count").unknown(str(count), list(ints), what="int parameter (defined above)")
    high = ints[count].distribution.high  # type: ignore[attr-defined]
    most = spec.get("max", high)
    if not isinstance(most, int) or isinstance(most, bool) or most < high or most > 1000:
        at.at("max").fail(f"must be an integer from {count}'s high ({high}) to 1000, got {most!r}")
    each = spec.get("each")
    if not isinstance(each, Mapping) or not each:
        at.at("each").fail(f"must be a group of parameters, got {describe(each)}")
    template: list[Param] = []
    _parse_group(each, at.at("each"), template, params)
    prefix = ".".join(at.at("each").path[1:]) + "."
    group = ".".join(check.path[1:])
    for i in range(most):
        for p in template:
            name = f"{group}.{i}.{p.name[len(prefix) :]}"
            when: dict[str, Rule] = {count: Compare(((">", i),))}
            for other, rule in p.when.items():  # a sibling in `each` is this layer's one
                inside = other.startswith(prefix)
                when[f"{group}.{i}.{other[len(prefix) :]}" if inside else other] = rule
            params.append(Param(name=name, distribution=p.distribution, when=when,
                                encoded=p.encoded))  # fmt: skip


def _parse_param(spec: Mapping[str, Any], check: Checker, earlier: list[Param]) -> Param:
    kind = spec["type"]
    if not isinstance(kind, str) or kind not in _KEYS:
        check.at("type").choice(kind, sorted(_KEYS))
    check.known_keys(spec, _KEYS[kind])
    name = ".".join(check.path[1:])
    if len(name) > MAX_PARAM_NAME:  # the width of Optuna's param_name column
        check.fail(f"the parameter's name is {len(name)} characters; at most {MAX_PARAM_NAME}")
    encoded = False
    if kind == "categorical":
        dist: BaseDistribution
        dist, encoded = _categorical(spec, check)
    else:
        dist = _numeric(kind, spec, check)
    group = name.rpartition(".")[0]
    when = _parse_when(spec.get("when"), check.at("when"), earlier, group + "." if group else "")
    return Param(name=name, distribution=dist, when=when, encoded=encoded)


def _categorical(spec: Mapping[str, Any], check: Checker) -> tuple[CategoricalDistribution, bool]:
    """The distribution, and whether its choices are lists or mappings (held as JSON text)."""
    at = check.at("choices")
    choices = spec.get("choices")
    if choices is None:
        check.fail("categorical parameters need 'choices'")
    if not isinstance(choices, list):
        at.fail(f"must be a list, got {describe(choices)}")
    if not choices:
        at.fail("must not be empty")
    if any(isinstance(c, (list, Mapping)) for c in choices):
        for i, choice in enumerate(choices):
            if not _plain_data(choice):
                at.at(str(i)).fail(
                    "choices must be YAML scalars, or lists and mappings of them, got "
                    f"{describe(choice)}"
                )
        texts = [encode_choice(c) for c in choices]
        if len(set(texts)) != len(texts):
            at.fail("choices must be unique")
        return CategoricalDistribution(texts), True
    for i, choice in enumerate(choices):
        if not is_scalar(choice):
            at.at(str(i)).fail(f"choices must be YAML scalars, got {describe(choice)}")
    if len({(type(c), c) for c in choices}) != len(choices):
        at.fail("choices must be unique")
    kinds = {c: {type(x).__name__ for x in choices if x == c} for c in choices}
    for c, names in kinds.items():
        if len(names) > 1:  # Optuna stores choices by equality: true would come back as 1
            at.fail(
                f"{' and '.join(sorted(names))} choices equal to {c!r} cannot be told apart "
                "(YAML true == 1 == 1.0); quote one to make it a string"
            )
    return CategoricalDistribution(choices), False


def _plain_data(value: Any) -> bool:
    """Scalars, and lists and string-keyed mappings of them, nested: what JSON holds as is."""
    if isinstance(value, list):
        return all(_plain_data(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain_data(v) for k, v in value.items())
    return is_scalar(value) and not (isinstance(value, float) and not math.isfinite(value))


def _numeric(kind: str, spec: Mapping[str, Any], check: Checker) -> BaseDistribution:
    is_int = kind == "int"
    bounds = {}
    for key in ("low", "high"):
        if key not in spec:
            check.fail(f"{kind} parameters need 'low' and 'high'")
        value = spec[key]
        ok = isinstance(value, int) if is_int else is_number(value)
        if not ok or isinstance(value, bool):
            check.at(key).fail(
                f"must be {'an integer' if is_int else 'a number'}, got {describe(value)}"
            )
        if not math.isfinite(value):
            check.at(key).fail(f"must be finite, got {value}")
        bounds[key] = value
    low, high = bounds["low"], bounds["high"]
    if low >= high:
        check.at("low").fail(f"must be < high, got low={low}, high={high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        check.at("log").fail(f"must be true or false, got {describe(log)}")
    step = spec.get("step")
    if step is not None:
        ok = isinstance(step, int) if is_int else is_number(step)
        if not ok or isinstance(step, bool) or not math.isfinite(step) or step <= 0:
            check.at("step").fail(
                f"must be a positive {'integer' if is_int else 'number'}, got {describe(step)}"
            )
        if log and (not is_int or step != 1):
            check.at("step").fail("cannot be combined with log: true")
        span = high - low
        if abs(round(span / step) * step - span) > 1e-9 * max(1.0, abs(span)):
            check.at("step").fail(f"must divide high - low = {span} evenly, got step={step}")
    if log and low <= 0:
        check.at("low").fail(f"must be > 0 when log is true, got {low}")
    if is_int:
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(float(low), float(high), log=log, step=step)


def _parse_when(
    when: Any, check: Checker, earlier: list[Param], group: str = ""
) -> dict[str, Rule]:
    """The rule of ``when:``; a name is a parameter's full dotted name, or a sibling's own
    name in the same ``group`` (so ``each:`` of a ``repeat:`` can say ``when: {act: relu}``)."""
    if when is None:
        return {}
    check.mapping(when)
    known = {p.name: p for p in earlier}
    rule: dict[str, Rule] = {}
    for given, wanted in when.items():
        at = check.at(str(given))
        name = given if given in known or f"{group}{given}" not in known else f"{group}{given}"
        if name not in known:
            at.unknown(str(name), list(known), what="parameter (when: names one defined above)")
        if isinstance(wanted, Mapping):
            rule[name] = _parse_compare(wanted, at, known[name].distribution)
            continue
        values = tuple(wanted) if isinstance(wanted, list) else (wanted,)
        if not values:
            at.fail("an empty list matches no value: give the values that enable this parameter")
        for value in values:
            if not _contains(known[name].distribution, known[name].to_optuna(value)):
                hint = "; a list choice goes inside the list of values: [[64, 64]]" if (
                    known[name].encoded and not isinstance(value, (list, Mapping))
                ) else ""  # fmt: skip
                at.fail(
                    f"{describe(value)} is not a possible value "
                    f"({_range(known[name].distribution, known[name].encoded)}){hint}"
                )
        if known[name].encoded:
            rule[name] = OneOfEncoded(frozenset(encode_choice(v) for v in values))
            continue
        rule[name] = values
    return rule


def _parse_compare(wanted: Mapping[Any, Any], at: Checker, d: BaseDistribution) -> Compare:
    if not wanted:
        at.fail("an empty mapping compares nothing: give e.g. {'>=': 2}")
    ops = []
    for op, bound in wanted.items():
        if op not in _COMPARE:
            at.fail(f"unknown comparison {op!r}; use one of {', '.join(_COMPARE)}")
        ordered = op != "!="
        if ordered and isinstance(d, CategoricalDistribution):
            at.at(str(op)).fail("a categorical parameter has no order; list its values instead")
        if ordered and not is_number(bound):
            at.at(str(op)).fail(f"must be a number, got {describe(bound)}")
        ops.append((str(op), bound))
    return Compare(tuple(ops))


def _suggest(trial: optuna.Trial, name: str, d: BaseDistribution) -> Any:
    if isinstance(d, FloatDistribution):
        return trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
    assert isinstance(d, CategoricalDistribution)
    return trial.suggest_categorical(name, d.choices)


def _contains(d: BaseDistribution, value: Any) -> bool:
    if isinstance(d, CategoricalDistribution):
        return any(type(value) is type(c) and value == c for c in d.choices)
    if isinstance(value, bool) or not is_number(value):
        return False
    if isinstance(d, IntDistribution) and not isinstance(value, int):
        return False
    return bool(d._contains(d.to_internal_repr(value)))


def _range(d: BaseDistribution, encoded: bool = False) -> str:
    if isinstance(d, CategoricalDistribution):
        choices = [json.loads(str(c)) for c in d.choices] if encoded else list(d.choices)
        return f"choices {choices}"
    assert isinstance(d, (FloatDistribution, IntDistribution))
    step = f", step {d.step}" if d.step not in (None, 1) else ""
    return f"{d.low}..{d.high}{step}"
