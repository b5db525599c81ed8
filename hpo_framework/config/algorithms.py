"""Optuna samplers and pruners by the names config.yaml uses, with their options checked."""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

import optuna

from hpo_framework import defaults
from hpo_framework._checks import Checker, describe, is_number
from hpo_framework.exceptions import MissingPackageError, UnsafeSamplerError
from hpo_framework.param_sampler import SearchSpace

SAMPLERS: dict[str, Any] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
    "qmc": optuna.samplers.QMCSampler,
    "grid": optuna.samplers.GridSampler,
}

PRUNERS: dict[str, Any] = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
}

#: Python packages a sampler needs beyond Optuna itself, and the extra that installs them.
_SAMPLER_NEEDS = {"gp": ("torch", "scipy"), "cmaes": ("cmaes",), "qmc": ("scipy",)}
_SINGLE_OBJECTIVE = {"cmaes", "gp"}
#: Samplers that store their state in the database as a pickle, which every worker unpickles:
#: whoever can write the database could run code in the workers. Refused unless the operator
#: opts in (see docs/SECURITY.md).
UNPICKLING_SAMPLERS = {"cmaes"}
# Options the framework sets itself; config.yaml may not pass them.
_RESERVED = {"seed", "search_space"}
#: The least value of numeric options whose constructor takes any number (Optuna checks the
#: others itself): (minimum, whether the minimum itself is allowed). A value out of range
#: passes the constructor and fails every trial later (``n_ei_candidates: -5``).
_MINIMUM: dict[str, dict[str, tuple[float, bool]]] = {
    "tpe": {
        "n_startup_trials": (0, True), "n_ei_candidates": (1, True), "prior_weight": (0, False),
    },
    "cmaes": {"sigma0": (0, False), "n_startup_trials": (0, True), "popsize": (2, True)},
    "gp": {"n_startup_trials": (0, True)},
    "hyperband": {
        "min_resource": (1, True), "max_resource": (1, True),
        "reduction_factor": (2, True), "bootstrap_count": (0, True),
    },
}  # fmt: skip


def check_sampler(
    name: Any, options: Mapping[str, Any], n_objectives: int, space: SearchSpace, check: Checker
) -> None:
    """Fail with a ConfigError unless ``build_sampler`` will work with these values."""
    if not isinstance(name, str) or name not in SAMPLERS:
        check.at("name").choice(name, SAMPLERS)
    missing = [m for m in _SAMPLER_NEEDS.get(name, ()) if importlib.util.find_spec(m) is None]
    if missing and check.host_checks:
        raise MissingPackageError(
            check.source, check.at("name").key,
            f"the '{name}' sampler needs the Python package '{missing[0]}': "
            "pip install 'hpo-framework[samplers,examples]'",
        )  # fmt: skip
    unsafe = name in UNPICKLING_SAMPLERS and os.environ.get(defaults.ALLOW_PICKLE_ENV) != "1"
    if unsafe and check.host_checks:
        raise UnsafeSamplerError(
            check.source, check.at("name").key,
            f"the '{name}' sampler keeps its state in the database as a pickle that every "
            "worker unpickles, so anyone who can write the database could run code in the "
            f"workers; set {defaults.ALLOW_PICKLE_ENV}=1 (coordinator and workers) only if "
            "nobody untrusted can write it",
        )  # fmt: skip
    if name in _SINGLE_OBJECTIVE and n_objectives > 1:
        check.at("name").fail(f"the '{name}' sampler supports a single direction only")
    _check_options(SAMPLERS[name], options, check.at("options"), _MINIMUM.get(name, {}))
    if missing:
        return  # read on a host that could not run it: its options are checked where it runs
    try:
        build_sampler(name, None, options, space, check.source)
    except (TypeError, ValueError) as e:
        check.at("options").fail(_one_line(e))


def check_pruner(name: Any, options: Mapping[str, Any], n_objectives: int, check: Checker) -> None:
    """Fail with a ConfigError unless ``build_pruner`` will work with these values."""
    if not isinstance(name, str) or name not in PRUNERS:
        check.at("name").choice(name, PRUNERS)
    if name != "none" and n_objectives > 1:
        check.at("name").fail("Optuna cannot prune multi-objective studies; use 'none'")
    _check_options(PRUNERS[name], options, check.at("options"), _MINIMUM.get(name, {}))
    low, high = options.get("min_resource"), options.get("max_resource")
    if name == "hyperband" and isinstance(low, int) and isinstance(high, int) and low > high:
        check.at("options", "max_resource").fail(f"must be >= min_resource ({low}), got {high}")
    try:
        build_pruner(name, options)
    except (TypeError, ValueError) as e:
        check.at("options").fail(_one_line(e))


def build_sampler(
    name: str, seed: int | None, options: Mapping[str, Any], space: SearchSpace, source: str
) -> optuna.samplers.BaseSampler:
    cls = SAMPLERS[name]
    kwargs = dict(options)
    if name == "grid":
        kwargs["search_space"] = space.grid(Checker(source))
    if "seed" in inspect.signature(cls).parameters:
        kwargs["seed"] = seed
    return cls(**kwargs)  # type: ignore[no-any-return]


def build_pruner(name: str, options: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    return PRUNERS[name](**options)  # type: ignore[no-any-return]


def worker_seed(seed: int | None, worker_index: int) -> int | None:
    """The sampler seed of one worker: distinct per worker so no two draw the same points."""
    if seed is None:
        return None
    return (seed + 7919 * worker_index) % 2**32


def _check_options(
    cls: Any, options: Mapping[str, Any], check: Checker, minimum: Mapping[str, tuple[float, bool]]
) -> None:
    params = inspect.signature(cls).parameters
    allowed = [p for p, v in params.items() if p not in _RESERVED and v.kind is not v.VAR_KEYWORD]
    for key in options:
        if key in _RESERVED:
            check.at(str(key)).fail(f"'{key}' is set by the framework; use study.sampler.seed")
        if key not in allowed:
            check.at(str(key)).unknown(str(key), allowed, what="option")
        wanted = _annotation(params[key].annotation)
        problem = _type_problem(wanted, options[key]) or _range_problem(
            options[key], minimum.get(key)
        )
        if problem:
            check.at(str(key)).fail(problem)


def _range_problem(value: Any, minimum: tuple[float, bool] | None) -> str | None:
    if minimum is None or not is_number(value):
        return None
    least, inclusive = minimum
    if value > least or (inclusive and value == least):
        return None
    return f"must be {'>=' if inclusive else '>'} {least:g}, got {describe(value)}"


def _annotation(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    return "" if annotation is inspect.Parameter.empty else getattr(annotation, "__name__", "")


#: What a YAML value can be, by the type names of Optuna's signatures.
_YAML_TYPES: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "None": lambda v: v is None,
    "dict": lambda v: isinstance(v, dict),
    "Mapping": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "Sequence": lambda v: isinstance(v, list),
    "tuple": lambda v: isinstance(v, list),
    "Callable": lambda v: False,
}


def _type_problem(annotation: str, value: Any) -> str | None:
    """Why ``value`` (from YAML) cannot be an argument of this annotation, if it surely cannot.
    Types YAML has no word for (a sampler object, say) are left to the constructor."""
    if not annotation:
        return None
    kinds = [part.strip().split("[")[0] for part in annotation.split("|")]
    if any(kind not in _YAML_TYPES for kind in kinds):
        return None
    if any(_YAML_TYPES[kind](value) for kind in kinds):
        return None
    if all(kind in ("Callable", "None") for kind in kinds):
        return "takes a Python function, which config.yaml cannot hold; leave it out"
    return f"must be {annotation}, got {describe(value)}"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
