"""config.yaml: read, checked as a whole before any trial runs, and kept as a ``Config``.

Every problem is reported as one line, ``<file>: <key.path>: <reason>``, through ConfigError.
The same checks run on a study's config stored in the database, so a worker trusts nothing.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hpo_framework import defaults
from hpo_framework._checks import Checker, describe, is_number
from hpo_framework.config.algorithms import check_pruner, check_sampler
from hpo_framework.config.host_policy import checkpoint_location_refusal, s3_endpoint_refusal
from hpo_framework.config.param_tree import flatten
from hpo_framework.exceptions import ConfigError, MissingPackageError, NotAllowedHereError
from hpo_framework.param_sampler import SearchSpace

TOP_KEYS = (
    "study", "session", "storage", "static", "search_space", "enqueue", "checkpoints", "tracking",
)  # fmt: skip
STUDY_KEYS = (
    "name", "direction", "directions", "n_trials", "timeout", "max_failed_trials",
    "sampler", "pruner", "heartbeat_interval", "grace_period", "max_retries", "trial_timeout",
    "stop_when", "on_done", "on_failed",
)  # fmt: skip
DIRECTIONS = ("minimize", "maximize")
#: ``package.module:function``; the function's name is public (no leading underscore).
_SESSION_REF = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z][\w]*$")
_MAX_DEPTH = 32
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: The shortest heartbeat_interval a study may ask for (seconds).
MIN_HEARTBEAT_S = 0.5
_MAX_BYTES = 1_000_000
_MAX_VALUES = 100_000  # guards against YAML alias bombs, which expand when walked


@dataclass(frozen=True)
class SamplerSpec:
    name: str = "tpe"
    seed: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrunerSpec:
    name: str = "none"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointSpec:
    """``checkpoints:``: where sessions' checkpoints live, and how many finished ones stay."""

    dir: str | None = None  # a directory every worker of the study sees (a shared volume)
    s3: str | None = None  # or s3://bucket/prefix (S3 or an S3-compatible service)
    endpoint_url: str | None = None  # the S3-compatible service's URL (MinIO...), if not AWS
    keep_best: int = 0  # checkpoints of the best N finished trials stay; the others go


@dataclass(frozen=True)
class TrackingSpec:
    """``tracking:``: where finished trials go besides the database (``tracking``)."""

    mlflow_uri: str | None = None  # tracking.mlflow.tracking_uri
    mlflow_experiment: str | None = None  # default: the study's name
    tensorboard_dir: str | None = None  # tracking.tensorboard.dir


@dataclass(frozen=True)
class StopWhen:
    """``study.stop_when``: stop the study early (single objective only)."""

    target: float | None = None  # a value this good has been reached
    patience: int | None = None  # this many finished trials since the best one

    def __bool__(self) -> bool:
        return self.target is not None or self.patience is not None


@dataclass(frozen=True)
class StudySpec:
    name: str
    directions: tuple[str, ...]
    n_trials: int | None
    timeout: float | None
    max_failed_trials: int | None
    sampler: SamplerSpec
    pruner: PrunerSpec
    heartbeat_interval: float
    grace_period: float
    max_retries: int
    trial_timeout: float | None = None
    stop_when: StopWhen = field(default_factory=StopWhen)
    on_done: str | None = None  # a URL or a command (hooks)
    on_failed: str | None = None


@dataclass(frozen=True)
class Config:
    """A checked config. ``raw`` is what the user wrote, as stored in the database."""

    source: str
    study: StudySpec
    session: str | None
    storage: str | None
    static: Mapping[str, Any]
    search_space: SearchSpace
    enqueue: tuple[Mapping[str, Any], ...]  # flat {dotted name: value}
    raw: Mapping[str, Any]
    checkpoints: CheckpointSpec | None = None
    tracking: TrackingSpec | None = None

    @property
    def hash(self) -> str:
        """Digest of the config's content, independent of key order and formatting."""
        text = json.dumps(self.raw, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def budget(self) -> int | None:
        """How many trials the study runs: ``n_trials``, capped by the grid's size for the grid
        sampler; None for no limit."""
        budget = self.study.n_trials
        if self.study.sampler.name == "grid":
            size = 1
            for values in self.search_space.grid(Checker(self.source)).values():
                size *= len(values)
            budget = size if budget is None else min(budget, size)
        return budget

    def with_name(self, name: str) -> Config:
        raw = dict(self.raw)
        raw["study"] = {**raw["study"], "name": name}
        return Config.from_mapping(raw, self.source)

    def with_overrides(self, assignments: list[str]) -> Config:
        """The config with ``key.path=value`` assignments applied (values read as YAML), rechecked.

        ``study.n_trials=8`` or ``static.epochs=3``: a missing mapping on the path is created; a
        value that is not a mapping on the path is refused, so a typo cannot replace a section.
        """
        raw = copy.deepcopy(dict(self.raw))
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            path = key.strip().split(".")
            if not sep or not all(path):
                raise ConfigError("--set", None, f"expected KEY.PATH=VALUE, got {assignment!r}")
            node = raw
            for i, part in enumerate(path[:-1]):
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    where = ".".join(path[: i + 1])
                    raise ConfigError("--set", key, f"{where} is {describe(child)}, not a mapping")
                node = child
            node[path[-1]] = parse_yaml(text, f"--set {key}")
        return Config.from_mapping(raw, f"{self.source} (with --set)")

    @classmethod
    def stored(cls, study_name: str, raw: Any, *, serving: bool = False) -> Config:
        """A study's config as stored in the database, checked again like a file; whether
        this host has what running it takes is checked only when it is to be ``serving``."""
        source = f"study {study_name!r} (stored config)"
        return _parse(raw, Checker(source, host_checks=serving))

    @classmethod
    def from_mapping(cls, raw: Any, source: str) -> Config:
        return _parse(raw, Checker(source))


def load_config(path: str | Path) -> Config:
    """Read and check a config file; raises ConfigError with a one-line message."""
    return Config.from_mapping(read_yaml_file(path), str(path))


def read_yaml_file(path: str | Path) -> Any:
    """A YAML file's content, read as a config is (size limit, UTF-8, keys given once);
    raises ConfigError with a one-line message."""
    path = Path(path)
    source = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(source, None, "file not found") from None
    except OSError as e:
        raise ConfigError(source, None, f"cannot read: {e.strerror}") from None
    if len(data) > _MAX_BYTES:
        raise ConfigError(source, None, f"file is larger than {_MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(source, None, f"not valid UTF-8 (byte {e.start})") from None
    return parse_yaml(text, source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (YAML keeps the last one
    silently: ``n_trials: 5`` then ``n_trials: 5000`` would run 5000)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key if isinstance(key, str) else id(key_node))
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    """YAML to Python with the safe loader; syntax errors name their line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f"line {mark.line + 1}: " if mark else ""
        problem = " ".join(str(e.problem or e.context or "invalid YAML").split())
        raise ConfigError(source, None, f"{line}YAML syntax error: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(source, None, f"YAML error: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(source, None, "YAML nests too deeply") from None
    except ValueError as e:  # an integer of more than 4300 digits
        reason = str(e).split(";")[0]
        raise ConfigError(source, None, f"YAML value out of range: {reason}") from None


def _parse(raw: Any, root: Checker) -> Config:
    if raw is None:
        root.fail("the file is empty; it needs at least 'study:' with a 'name'")
    root.mapping(raw)
    _check_plain_data(raw, root, 0, [_MAX_VALUES])
    root.known_keys(raw, TOP_KEYS)
    if "study" not in raw:
        root.at("study").fail("missing; every config needs a 'study:' section with a 'name'")

    space = SearchSpace.parse(raw.get("search_space"), root.at("search_space"))
    study = _parse_study(raw["study"], root.at("study"), space)

    session = raw.get("session")
    if isinstance(session, str) and session.partition(":")[2].startswith("_"):
        root.at("session").fail(f"{session!r} names a private function; sessions are public")
    if session is not None and (not isinstance(session, str) or not _SESSION_REF.match(session)):
        root.at("session").fail(
            f"must look like 'package.module:function', got {describe(session)}"
        )
    storage = raw.get("storage")
    if storage is not None and (not isinstance(storage, str) or not storage.strip()):
        root.at("storage").fail(f"must be a database URL string, got {describe(storage)}")

    static = raw.get("static") or {}
    root.at("static").mapping(static)
    for name in flatten(static):
        if name in space:
            root.at("search_space", *name.split(".")).fail(
                "is also set under static:; a parameter is either static or searched"
            )
        for searched in space.names:  # static model: 3 beside searched model.hidden
            if searched.startswith(name + ".") or name.startswith(searched + "."):
                root.at("static", *name.split(".")).fail(
                    f"overlaps the searched parameter {searched!r}: one would replace the "
                    "other in cfg; rename one of them"
                )

    enqueue = raw.get("enqueue") or []
    if not isinstance(enqueue, list):
        root.at("enqueue").fail(f"must be a list of parameter mappings, got {describe(enqueue)}")
    points = tuple(space.check_point(p, root.at("enqueue", str(i))) for i, p in enumerate(enqueue))

    return Config(
        source=root.source, study=study, session=session, storage=storage,
        static=static, search_space=space, enqueue=points, raw=raw,
        checkpoints=_parse_checkpoints(raw.get("checkpoints"), root.at("checkpoints")),
        tracking=_parse_tracking(raw.get("tracking"), root.at("tracking")),
    )  # fmt: skip


def _parse_tracking(raw: Any, check: Checker) -> TrackingSpec | None:
    if raw is None:
        return None
    check.mapping(raw)
    check.known_keys(raw, ("mlflow", "tensorboard"))
    values: dict[str, str | None] = {}
    for section, keys, required in (
        ("mlflow", ("tracking_uri", "experiment"), "tracking_uri"),
        ("tensorboard", ("dir",), "dir"),
    ):
        part = raw.get(section)
        if part is None:
            continue
        at = check.at(section)
        at.mapping(part)
        at.known_keys(part, keys)
        if required not in part:
            at.at(required).fail("missing")
        for key in keys:
            value = part.get(key)
            if key in part and (
                not isinstance(value, str) or not value.strip() or _CONTROL.search(value)
            ):
                at.at(key).fail(f"must be a non-empty string, got {describe(value)}")
            values[f"{section}.{key}"] = value
    return TrackingSpec(
        mlflow_uri=values.get("mlflow.tracking_uri"),
        mlflow_experiment=values.get("mlflow.experiment"),
        tensorboard_dir=values.get("tensorboard.dir"),
    )


def _parse_checkpoints(raw: Any, check: Checker) -> CheckpointSpec | None:
    if raw is None:
        return None
    check.mapping(raw)
    check.known_keys(raw, ("dir", "s3", "endpoint_url", "keep_best"))
    if ("dir" in raw) == ("s3" in raw):
        check.fail("give either 'dir' (a shared directory) or 's3' (s3://bucket/prefix)")
    for key in ("dir", "s3", "endpoint_url"):
        value = raw.get(key)
        if key in raw and (
            not isinstance(value, str) or not value.strip() or _CONTROL.search(value)
        ):
            kind = {"dir": "a directory path", "s3": "an s3://bucket/prefix URL"}.get(key, "a URL")
            check.at(key).fail(f"must be {kind}, got {describe(value)}")
    s3, endpoint = raw.get("s3"), raw.get("endpoint_url")
    if s3 is not None and (not s3.startswith("s3://") or not s3[5:].partition("/")[0]):
        check.at("s3").fail(f"must be s3://bucket or s3://bucket/prefix, got {s3!r}")
    if s3 is not None and check.host_checks and importlib.util.find_spec("boto3") is None:
        raise MissingPackageError(
            check.source, check.at("s3").key,
            "S3 checkpoints need the Python package 'boto3': pip install 'hpo-framework[s3]'",
        )  # fmt: skip
    if endpoint is not None and s3 is None:
        check.at("endpoint_url").fail("is for 's3' checkpoints only")
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        check.at("endpoint_url").fail(f"must be an http:// or https:// URL, got {endpoint!r}")
    keep = _optional_int(raw, "keep_best", check, 0, minimum=0)
    if check.host_checks:  # what this host's operator allows (the config may come from the db)
        for key, refusal in (
            ("endpoint_url", s3_endpoint_refusal(endpoint)),
            ("s3" if s3 else "dir", checkpoint_location_refusal(raw.get("dir"), s3)),
        ):
            if refusal:
                raise NotAllowedHereError(check.source, check.at(key).key, refusal)
    return CheckpointSpec(dir=raw.get("dir"), s3=s3, endpoint_url=endpoint, keep_best=keep or 0)


def _parse_study(raw: Any, check: Checker, space: SearchSpace) -> StudySpec:
    check.mapping(raw)
    check.known_keys(raw, STUDY_KEYS)
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        check.at("name").fail(f"must be a non-empty string, got {describe(name)}")
    if len(name) > 500:
        check.at("name").fail("must be at most 500 characters")
    if _CONTROL.search(name):
        check.at("name").fail(f"must not hold control characters, got {name!r}")

    if raw.get("direction") is not None and "directions" in raw:
        check.at("directions").fail("give either 'direction' or 'directions', not both")
    if "directions" in raw:
        directions = raw["directions"]
        if not isinstance(directions, list) or not directions:
            check.at("directions").fail("must be a non-empty list of minimize/maximize")
    else:
        directions = [raw.get("direction", "minimize")]
    key = "directions" if "directions" in raw else "direction"
    for i, d in enumerate(directions):
        if d not in DIRECTIONS:
            at = check.at(key, str(i)) if key == "directions" else check.at(key)
            at.choice(d, DIRECTIONS)

    n_trials = _optional_int(raw, "n_trials", check, defaults.N_TRIALS, minimum=1)
    timeout = _optional_number(raw, "timeout", check, None)
    max_failed = _optional_int(
        raw, "max_failed_trials", check, defaults.MAX_FAILED_TRIALS, minimum=1
    )
    heartbeat = _optional_number(raw, "heartbeat_interval", check, defaults.HEARTBEAT_INTERVAL)
    grace = _optional_number(raw, "grace_period", check, defaults.GRACE_PERIOD)
    assert heartbeat is not None and grace is not None
    if "heartbeat_interval" in raw and raw["heartbeat_interval"] is None:
        check.at("heartbeat_interval").fail("must be a number of seconds > 0")
    if heartbeat < MIN_HEARTBEAT_S:  # every running trial writes the database this often
        check.at("heartbeat_interval").fail(
            f"must be at least {MIN_HEARTBEAT_S} s (each running trial writes to the database "
            f"this often), got {heartbeat:g}"
        )
    if grace <= heartbeat:
        check.at("grace_period").fail(
            f"must be longer than heartbeat_interval ({heartbeat}), got {grace}"
        )
    max_retries = _optional_int(raw, "max_retries", check, defaults.MAX_RETRIES, minimum=0)
    if max_retries is None:
        check.at("max_retries").fail("must be an integer >= 0 (0: no retries), got null")
    trial_timeout = _optional_number(raw, "trial_timeout", check, None)
    stop_when = _parse_stop_when(raw.get("stop_when"), check.at("stop_when"), len(directions))
    hooks = {}
    for key in ("on_done", "on_failed"):
        hook = raw.get(key)
        usable = isinstance(hook, str) and hook.strip() and len(hook) <= 2000
        if hook is not None and not usable:
            check.at(key).fail(
                f"must be a URL (http:// or https://) or a shell command, got {describe(hook)}"
            )
        hooks[key] = hook

    sampler = _parse_sampler(raw.get("sampler"), check.at("sampler"), len(directions), space)
    pruner = _parse_pruner(raw.get("pruner"), check.at("pruner"), len(directions))
    return StudySpec(
        name=name, directions=tuple(directions), n_trials=n_trials, timeout=timeout,
        max_failed_trials=max_failed, sampler=sampler, pruner=pruner,
        heartbeat_interval=float(heartbeat), grace_period=float(grace), max_retries=max_retries,
        trial_timeout=trial_timeout, stop_when=stop_when, **hooks,
    )  # fmt: skip


def _parse_stop_when(raw: Any, check: Checker, n_objectives: int) -> StopWhen:
    if raw is None:
        return StopWhen()
    check.mapping(raw)
    check.known_keys(raw, ("target", "patience"))
    if n_objectives > 1:
        check.fail("needs a single objective (several directions have no single best value)")
    target = raw.get("target")
    if target is not None and (not is_number(target) or not math.isfinite(target)):
        check.at("target").fail(f"must be a finite number or null, got {describe(target)}")
    patience = _optional_int(raw, "patience", check, None, minimum=1)
    return StopWhen(None if target is None else float(target), patience)


def _parse_sampler(raw: Any, check: Checker, n_objectives: int, space: SearchSpace) -> SamplerSpec:
    if raw is None:
        raw = {"name": "tpe"}
    if isinstance(raw, str):
        raw = {"name": raw}
    check.mapping(raw)
    check.known_keys(raw, ("name", "seed", "options"))
    seed = raw.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        check.at("seed").fail(f"must be a non-negative integer, got {describe(seed)}")
    options = raw.get("options") or {}
    check.at("options").mapping(options)
    name = raw.get("name", "tpe")
    check_sampler(name, options, n_objectives, space, check)
    return SamplerSpec(name=name, seed=seed, options=options)


def _parse_pruner(raw: Any, check: Checker, n_objectives: int) -> PrunerSpec:
    if raw is None:
        raw = {"name": "none"}
    if isinstance(raw, str):
        raw = {"name": raw}
    check.mapping(raw)
    check.known_keys(raw, ("name", "options"))
    options = raw.get("options") or {}
    check.at("options").mapping(options)
    name = raw.get("name", "none")
    check_pruner(name, options, n_objectives, check)
    return PrunerSpec(name=name, options=options)


def _optional_int(
    raw: Mapping[str, Any], key: str, check: Checker, default: int | None, minimum: int
) -> int | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        check.at(key).fail(f"must be an integer >= {minimum} or null, got {describe(value)}")
    if value > 10**9:
        check.at(key).fail(f"must be at most 1000000000, got {value}")
    return value


def _optional_number(
    raw: Mapping[str, Any], key: str, check: Checker, default: float | None
) -> float | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if not is_number(value) or not math.isfinite(value) or value <= 0 or value > 10**9:
        check.at(key).fail(f"must be a number of seconds > 0 or null, got {describe(value)}")
    return float(value)


def _check_plain_data(value: Any, check: Checker, depth: int, budget: list[int]) -> None:
    """Only JSON-like data may be stored and shared with workers (no dates, no binary)."""
    budget[0] -= 1
    if budget[0] < 0:
        Checker(check.source).fail(f"holds more than {_MAX_VALUES} values (YAML aliases?)")
    if depth > _MAX_DEPTH:
        check.fail(f"nested more than {_MAX_DEPTH} levels deep")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                check.at(str(key)).fail(f"keys must be strings, got {describe(key)}")
            if _CONTROL.search(key):
                check.fail(f"key {key!r} holds control characters")
            _check_plain_data(item, check.at(key), depth + 1, budget)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain_data(item, check.at(str(i)), depth + 1, budget)
    elif value is not None and not isinstance(value, (bool, int, float, str)):
        check.fail(f"unsupported value {describe(value)}; quote it to make it a string")
    elif isinstance(value, float) and not math.isfinite(value):
        check.fail(f"must be a finite number, got {value}")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        check.fail(f"integer out of range (at most 19 digits), got {str(value)[:24]}...")
