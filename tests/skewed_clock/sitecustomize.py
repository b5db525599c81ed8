"""Loaded first by every Python process started with this folder on PYTHONPATH: its clock
(``time.time``, ``datetime.now``/``utcnow``/``today``) runs ``HPO_TEST_SKEW_S`` seconds off,
as on a host whose clock drifted. Monotonic clocks and the database's clock are untouched."""

import datetime as _dt
import os
import sys
import time as _time

_SKEW = float(os.environ.get("HPO_TEST_SKEW_S", "0"))

if _SKEW:
    _real_time = _time.time
    _time.time = lambda: _real_time() + _SKEW  # type: ignore[assignment]
    _delta = _dt.timedelta(seconds=_SKEW)
    _Real = _dt.datetime

    class _SkewedDatetime(_Real):  # type: ignore[misc, valid-type]
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def]
            return _Real.now(tz) + _delta

        @classmethod
        def utcnow(cls):  # type: ignore[no-untyped-def]
            return _Real.utcnow() + _delta

        @classmethod
        def today(cls):  # type: ignore[no-untyped-def]
            return _Real.today() + _delta

    _dt.datetime = _SkewedDatetime  # type: ignore[misc]
    print(f"[test] clock skewed by {_SKEW:+g}s in pid {os.getpid()}", file=sys.stderr, flush=True)
