"""Small helpers that turn a bad value into a one-line :class:`ConfigError`."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

from hpo_framework.exceptions import ConfigError


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_scalar(value: Any) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return value is None or isinstance(value, (bool, int, float, str))


#: What YAML 1.1 (PyYAML) reads as a string though it looks like a number: 1e-3, 5E+2.
_YAML11_EXPONENT = re.compile(r"^[-+]?\d+[eE][-+]?\d+$")


def describe(value: Any) -> str:
    """How a value reads in an error: its repr, shortened, and its YAML type for containers."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, str) and _YAML11_EXPONENT.match(value.strip()):
        mantissa, _, exponent = value.strip().lower().partition("e")
        text += f" (YAML reads {value.strip()} as text; write {mantissa}.0e{exponent})"
    return text


class Checker:
    """A position in a config file: the file's name and a key path inside it."""

    def __init__(
        self, source: str, path: tuple[str, ...] = (), *, host_checks: bool = True
    ) -> None:
        self.source = source
        self.path = path
        # Whether this host must be able to run the config (its packages, its consent to
        # unpickling samplers): for a file being created or a study being served, not for a
        # stored config that is only read (inspect, set, enqueue, the stale sweep).
        self.host_checks = host_checks

    def at(self, *keys: str) -> Checker:
        path = self.path + tuple(str(k) for k in keys)
        return Checker(self.source, path, host_checks=self.host_checks)

    @property
    def key(self) -> str | None:
        return ".".join(self.path) or None

    def fail(self, reason: str) -> NoReturn:
        raise ConfigError(self.source, self.key, reason)

    def mapping(self, value: Any) -> None:
        if not isinstance(value, Mapping):
            self.fail(f"must be a mapping, got {describe(value)}")

    def unknown(self, key: str, known: Iterable[str], what: str = "key") -> NoReturn:
        self.fail(f"unknown {what} '{key}'{did_you_mean(key, known)}")

    def known_keys(self, value: Mapping[str, Any], allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        for key in value:
            if key not in allowed:
                self.at(str(key)).unknown(str(key), allowed)

    def choice(self, value: Any, allowed: Iterable[str]) -> NoReturn:
        allowed = list(allowed)
        if isinstance(value, str):
            close = difflib.get_close_matches(value, allowed, n=1)
            if close:
                self.fail(f"unknown value '{value}'; did you mean '{close[0]}'?")
        self.fail(f"must be one of {', '.join(allowed)}, got {describe(value)}")


def did_you_mean(
    word: str, known: Iterable[str], listing: str = "expected one of", none: str = ""
) -> str:
    """ "; did you mean 'x'?" for a near miss, else the known names (at most 10), else ``none``."""
    names = sorted(set(known))
    close = difflib.get_close_matches(word, names, n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    if not names:
        return none
    more = f" (and {len(names) - 10} more)" if len(names) > 10 else ""
    return f"; {listing}: {', '.join(names[:10])}{more}"
