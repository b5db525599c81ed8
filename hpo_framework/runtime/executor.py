"""Where a session runs: the executor, a child process of the worker kept across trials.

A worker is a *supervisor* (tickets, heartbeats, the database, signals) that never runs user
code, and an executor process that imports the session and runs one trial after another
(module-level caches, loaded data and CUDA contexts survive between trials). Whatever the
session does there (raise any BaseException, hold the GIL, segfault, ``os._exit``, run out of
memory, hang with signals masked, fork children) fails at most its own trial: the supervisor
keeps beating, records the reason, and starts a new executor for the next trial. The executor
leads its own process group, so a terminal's Ctrl-C reaches only the supervisor and
``trial_timeout`` ends the session together with every child it left behind.

The protocol, over a socket pair (pickled tuples), supervisor -> executor:

- ``("check", ref, allowed)``: import the session here -> ``("ok",)`` or ``("error", text)``
- ``("run", ref, allowed, cfg, n_objectives, info)`` -> any number of
  ``("report", value, step)``, ``("attr", key, value)`` (``set_attr``),
  ``("log", step, metrics)`` (``trial().log``), ``("suggest", kind, name, kwargs)``
  (``trial().suggest_*``) and ``("constraint", key, value)`` (``trial().set_constraint``),
  each answered with
  ``("continue",)``, ``("value", v)``, ``("prune", message)``, ``("lost",)`` or
  ``("error", text)``, then one :class:`SessionResult`.

``run_hpo`` with a session that cannot be imported by reference (a closure, a lambda, a
function of ``__main__``) uses :class:`InProcessExecutor`, the same calls in its own process.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from numbers import Real
from typing import TYPE_CHECKING, Any

from hpo_framework import defaults, exceptions
from hpo_framework.exceptions import SessionError, TrialLost
from hpo_framework.session.reporting import TrialLink, bound_to

if TYPE_CHECKING:
    from hpo_framework.runtime.forkserver import ForkedProcess

log = logging.getLogger("hpo.executor")
_MAIN = "hpo_framework.runtime._executor_main"  # python -m _MAIN FD PARENT [MODULE...]

SessionFn = Callable[[dict[str, Any]], Any]

#: Seconds between SIGTERM and SIGKILL when an executor is ended (trial_timeout, shutdown).
KILL_GRACE_S = 5.0


class ObjectiveCountError(SessionError):
    """Raised when a session returns a different number of values than there are directions.

    Unlike a NaN or an exception, this is the same for every trial: a configuration mistake.
    """


@dataclass(frozen=True)
class SessionResult:
    """How one session call ended: ``done`` (with values), ``pruned``, ``lost`` or ``failed``."""

    kind: str
    values: list[float] | None = None
    error: str | None = None
    traceback: str | None = None
    #: The session broke the study's contract (wrong number of values): stop the study.
    fatal: bool = False


# --- the score ----------------------------------------------------------------------------------


def _is_bool(v: Any) -> bool:
    dtype = getattr(v, "dtype", None)  # numpy.bool_, a torch bool tensor
    return isinstance(v, bool) or (dtype is not None and str(dtype) in ("bool", "torch.bool"))


def check_result(result: Any, n_objectives: int) -> list[float]:
    """The session's return value as a list of finite floats, or SessionError saying why.

    Python, numpy and torch numbers are accepted alike, as scalars or as a sequence or array
    with one value per direction; booleans of any kind are refused.
    """
    if hasattr(result, "tolist") and not isinstance(result, (list, tuple)):
        converted = result.tolist()  # numpy/torch: a scalar becomes a number, an array a list
        if not _is_bool(result) or isinstance(converted, list):
            result = converted
    values = list(result) if isinstance(result, (list, tuple)) else [result]
    if len(values) != n_objectives:
        count = f"{len(values)} value{'' if len(values) == 1 else 's'}"
        raise ObjectiveCountError(
            f"session returned {count} but the study has {n_objectives} directions"
        )
    checked = []
    for v in values:
        try:
            if (
                _is_bool(v)
                or isinstance(v, (str, bytes))
                or not (isinstance(v, Real) or hasattr(v, "__float__"))
            ):
                raise TypeError
            f = float(v)
        except (TypeError, ValueError):
            text = repr(v)[:80]
            raise SessionError(
                f"session returned {text} ({type(v).__name__}), not a number"
            ) from None
        if not math.isfinite(f):
            raise SessionError(f"session returned {f}, not a finite number")
        checked.append(f)
    return checked


# --- one session call, wherever it runs ---------------------------------------------------------


def call_session(
    fn: SessionFn,
    cfg: dict[str, Any],
    link: TrialLink,
    n_objectives: int,
    passthrough: tuple[type[BaseException], ...] = (),
) -> SessionResult:
    """Call the session once and say how it ended; only ``passthrough`` exceptions escape."""
    try:
        with bound_to(link):
            result = fn(cfg)
        return SessionResult("done", values=check_result(result, n_objectives))
    except TrialLost:
        return SessionResult("lost")
    except passthrough:
        raise
    except BaseException as e:  # the session's failure is the trial's, whatever it raised
        if is_pruned(e):
            return SessionResult("pruned", error=str(e))
        ours = isinstance(e, SessionError)  # a bad return value: its message says it all
        return SessionResult(
            "failed",
            error=describe_error(e),
            traceback=None if ours else _short_traceback(e),
            fatal=isinstance(e, ObjectiveCountError),
        )


def describe_error(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"session called sys.exit({e.code!r})"
    if isinstance(e, SessionError):  # our own wording already says what went wrong
        return str(e)
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[: defaults.ERROR_TEXT_MAX] if text else type(e).__name__


def _short_traceback(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-3)).rstrip()


def importable_ref(fn: SessionFn) -> str | None:
    """``module:function`` if ``fn`` can be imported by that name in another process."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or not name.isidentifier():
        return None
    return f"{module}:{name}" if getattr(sys.modules.get(module), name, None) is fn else None


# --- in this process (run_hpo with a closure) ---------------------------------------------------


class TrialTimeout(BaseException):
    """Raised in an in-process session by the ``trial_timeout`` alarm (a BaseException, so
    that a session's ``except Exception`` cannot swallow it)."""


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Interrupt the session after ``seconds`` with SIGALRM (main thread only)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TrialTimeout(f"trial_timeout of {seconds:g}s exceeded")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class InProcessExecutor:
    """Runs ``session_fn`` in this process: for sessions no other process can import.

    Ctrl-C (KeyboardInterrupt) still stops ``run_hpo``; ``trial_timeout`` is a SIGALRM, which
    a session stuck in one long C call does not see.
    """

    def __init__(self, session_fn: SessionFn) -> None:
        self.session_fn = session_fn

    def check(self, ref: str) -> None:
        """Nothing to import: the function is already here."""

    def run(
        self, ref: str, cfg: dict[str, Any], link: TrialLink, n_objectives: int,
        timeout: float | None,
    ) -> SessionResult:  # fmt: skip
        cfg = copy.deepcopy(cfg)  # nothing a session does to its cfg reaches another trial
        try:
            with _time_limit(timeout):
                return call_session(
                    self.session_fn, cfg, link, n_objectives, passthrough=(KeyboardInterrupt,)
                )
        except TrialTimeout as e:
            return SessionResult("failed", error=str(e))

    def close(self) -> None:
        pass


# --- in a child process (every worker) ----------------------------------------------------------


class ProcessExecutor:
    """The supervisor's handle on its executor process, started on first use and replaced
    whenever it dies. ``allowed`` are the module prefixes sessions may be imported from."""

    def __init__(
        self, allowed: Sequence[str] | None = None, preload: Sequence[str] | None = None
    ) -> None:
        from hpo_framework.runtime import forkserver

        self.allowed = None if allowed is None else tuple(allowed)
        self.preload = preload_modules() if preload is None else tuple(preload)
        self._forks = forkserver.attached()  # in a pool: executors are forked, not spawned
        self._proc: subprocess.Popen[bytes] | ForkedProcess | None = None
        self._conn: Connection | None = None

    def start(self, wait: bool = True) -> None:
        """Start the executor now (it imports in parallel with the supervisor's own start).
        ``wait=False``: not if that means waiting for a pool's fork server to finish importing
        the preload (the executor is then forked at its first use)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        if not wait and self._forks is not None and not self._forks.ready():
            return
        self._discard()
        mine, theirs = socket.socketpair()
        try:
            if self._forks is not None:
                self._proc = self._fork(theirs.fileno())
                if self._proc is None:  # a late fork would serve this pair: take a new one
                    mine.close()
                    theirs.close()
                    mine, theirs = socket.socketpair()
            if self._proc is None:
                self._proc = self._spawn(theirs.fileno())
        finally:
            theirs.close()
        self._conn = Connection(mine.detach())

    def _fork(self, fd: int) -> ForkedProcess | None:
        """An executor forked by the pool's fork server, or None if it cannot fork one."""
        from hpo_framework.runtime.forkserver import ForkRefused

        assert self._forks is not None
        try:
            return self._forks.spawn(fd, self.preload)
        except ForkRefused as e:  # this one: the next is asked for again
            log.warning("no session process from the pool's fork server (%s); starting it", e)
        except OSError as e:
            log.warning(
                "no session process from the pool's fork server (%s); starting them anew", e
            )
            self._forks = None
        return None

    def _spawn(self, fd: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", _MAIN, str(fd), str(os.getpid()), *self.preload],
            pass_fds=[fd], start_new_session=True,
        )  # fmt: skip

    def check(self, ref: str) -> None:
        """Import ``ref`` in the executor; SessionError with the reason if it fails here."""
        reply = self._ask(("check", ref, self.allowed))
        if reply[0] != "ok":
            raise SessionError(str(reply[1]))

    def run(
        self, ref: str, cfg: dict[str, Any], link: TrialLink, n_objectives: int,
        timeout: float | None,
    ) -> SessionResult:  # fmt: skip
        """Run one session call; ``link`` answers the session's ``report`` calls."""
        self.start()
        conn = self._conn
        assert conn is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            conn.send(("run", ref, self.allowed, cfg, n_objectives, dict(link.info)))
            while True:
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    self.kill()
                    return SessionResult("failed", error=f"trial_timeout of {timeout:g}s exceeded")
                if not conn.poll(wait):
                    continue
                message = conn.recv()
                if isinstance(message, SessionResult):
                    return message
                conn.send(_answer(link, message))
        except (EOFError, OSError):
            return SessionResult("failed", error=self._death())
        except BaseException:  # a cold stop of the worker: the session goes with the trial
            self.kill()
            raise

    def _ask(self, message: tuple[Any, ...]) -> tuple[Any, ...]:
        self.start()
        assert self._conn is not None
        try:
            self._conn.send(message)
            reply: tuple[Any, ...] = self._conn.recv()
            return reply
        except (EOFError, OSError):
            return ("error", self._death())

    def _death(self) -> str:
        """Why the executor ended, once it has; the group's leftovers are killed with it."""
        proc = self._proc
        assert proc is not None
        code: int | None
        try:
            code = proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:  # closed its end of the pipe but lives on
            self.kill()
            code = proc.returncode
        self._kill_group(signal.SIGKILL)
        self._discard()
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            return f"session process killed by {name}{hint}"
        return f"session process exited with status {code}"

    def kill(self) -> None:
        """End the executor and everything in its process group: SIGTERM, then SIGKILL."""
        proc = self._proc
        if proc is None:
            return
        self._kill_group(signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        self._kill_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=KILL_GRACE_S)
        self._discard()

    def close(self) -> None:
        """Let the executor exit (end of input), then make sure its group is gone."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            self.kill()

    def _kill_group(self, sig: int) -> None:
        from hpo_framework.runtime.forkserver import ForkedProcess

        proc = self._proc
        if proc is None:
            return
        forked = isinstance(proc, ForkedProcess)
        if isinstance(proc, ForkedProcess) and proc.poll() is not None and proc.group_killed:
            return  # the fork server killed its group as it reaped it: the pid may be reused
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            if forked and proc.returncode is None:  # forked a moment ago: no setsid yet
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(proc.pid, sig)
        except PermissionError:
            pass

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._proc = None, None


def _answer(link: TrialLink, message: tuple[Any, ...]) -> tuple[Any, ...]:
    """The supervisor's answer to a ``("report", value, step)``, ``("attr", key, value)`` or
    ``("suggest", kind, name, kwargs)`` (answered with ``("value", v)``)."""
    what = {
        "attr": "trial().set_attr", "suggest": "trial().suggest", "log": "trial().log",
        "constraint": "trial().set_constraint",
    }.get(message[0], "report()")  # fmt: skip
    try:
        if message[0] == "attr":
            link.set_attr(message[1], message[2])
        elif message[0] == "log":
            link.log(message[1], message[2])
        elif message[0] == "constraint":
            link.constrain(message[1], message[2])
        elif message[0] == "suggest":
            return ("value", link.suggest(message[1], message[2], message[3]))
        else:
            link.report(message[1], message[2])
    except TrialLost as e:
        return ("lost", str(e))
    except Exception as e:  # e.g. the database gone for longer than the retry deadline
        if is_pruned(e):
            return ("prune", str(e))
        return ("error", f"{what} failed: {describe_error(e)}")
    return ("continue",)


class _PipeLink:
    """The executor's side of ``report``: ask the supervisor, which owns the Optuna trial."""

    def __init__(self, conn: Connection, info: Mapping[str, Any]) -> None:
        self.conn = conn
        self.info = info

    def report(self, value: float, step: int) -> None:
        self._ask(("report", value, step))

    def set_attr(self, key: str, value: Any) -> None:
        self._ask(("attr", key, value))

    def log(self, step: int | None, metrics: Mapping[str, float | int]) -> None:
        self._ask(("log", step, dict(metrics)))

    def suggest(self, kind: str, name: str, kwargs: Mapping[str, Any]) -> Any:
        return self._ask(("suggest", kind, name, dict(kwargs)))

    def constrain(self, key: str, value: float) -> None:
        self._ask(("constraint", key, value))

    def _ask(self, message: tuple[Any, ...]) -> Any:
        self.conn.send(message)
        answer = self.conn.recv()
        if answer[0] == "value":
            return answer[1]
        if answer[0] == "prune":
            raise exceptions.TrialPruned(answer[1])
        if answer[0] == "lost":
            raise TrialLost(answer[1])
        if answer[0] == "error":
            raise SessionError(answer[1])


def _serve(conn: Connection) -> None:
    from hpo_framework.session.reference import import_session

    sessions: dict[str, SessionFn] = {}

    def load(ref: str, allowed: Sequence[str] | None) -> SessionFn:
        if ref not in sessions:
            sessions[ref] = import_session(ref, allowed)
        return sessions[ref]

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "check":
            try:
                load(message[1], message[2])
                conn.send(("ok",))
            except SessionError as e:
                conn.send(("error", str(e)))
            continue
        _, ref, allowed, cfg, n_objectives, info = message
        try:
            fn = load(ref, allowed)
        except SessionError as e:
            conn.send(SessionResult("failed", error=str(e)))
            continue
        conn.send(call_session(fn, cfg, _PipeLink(conn, info), n_objectives))


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: send ``sig`` to this process when its parent dies (kill -9 of the worker)."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, sig)


def is_pruned(e: BaseException) -> bool:
    """hpo's ``TrialPruned`` or Optuna's (a session may raise either), told by class name and
    module: comparing with the classes would import Optuna into every executor process, a
    third of its start, for sessions that never prune."""
    return any(
        c.__name__ == "TrialPruned"
        and c.__module__ in ("hpo_framework.exceptions", "optuna.exceptions")
        for c in type(e).__mro__
    )


def preload_modules() -> tuple[str, ...]:
    """The modules of ``HPO_PRELOAD``: named by this host's operator, never by the database."""
    names = os.environ.get(defaults.PRELOAD_ENV, "").split(",")
    return tuple(name.strip() for name in names if name.strip())


def import_preload(names: Sequence[str], who: str) -> None:
    """Import the operator's preload modules; one that fails is said on stderr, and skipped:
    the session's own check reports it again, in full."""
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001 - even SystemExit: say it, go on
            print(f"{who}: cannot preload {name!r}: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)  # fmt: skip


def serve_forever(fd: int, parent: int, preload: Sequence[str] = ()) -> None:
    """The executor process's whole life (``python -m`` :data:`_MAIN` ``FD PARENT [MODULE...]``):
    import the ``preload`` modules, then serve the supervisor."""
    die_with_parent()
    if os.getppid() != parent:  # the worker died before the line above: nobody to serve
        os._exit(0)
    try:
        import_preload(preload, "hpo executor")
        _serve(Connection(fd))
    finally:  # no interpreter teardown: nothing of the session's outlives its process
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
