"""A pool's fork server: one process per host that imports the preload modules once and forks
every executor of the pool's workers from that import.

Without it each worker's executor is a fresh interpreter that imports ``HPO_PRELOAD``'s modules
(torch: about 2 s of CPU) again, and again after every crash or ``trial_timeout``. With it the
pool (``hpo-worker --processes N`` or ``--gpus``) starts one more process, as the multiprocessing
``forkserver`` does: a fresh interpreter (no threads, no connections) that imports them, then
forks one executor per request. A forked executor gets the requesting worker's environment
(``CUDA_VISIBLE_DEVICES``), working directory and fresh random seeds (Python's, NumPy's and
torch's, as a new process would), leads its own process group, and runs the same serving loop
as a spawned one.

What a spawned executor gets from being the worker's child, a forked one gets from here:

- its exit status: the server reaps it and sends ``("exit", pid, code)`` to the worker that
  asked for it (the code as ``subprocess`` gives it: negative for a signal);
- death with its worker: when a worker's connection closes (it exited, or was killed with
  ``-9``), the server kills the process groups of that worker's executors with SIGKILL;
- death with its parent: an executor dies with the server (``PR_SET_PDEATHSIG``).

The server outlives the pool's parent as long as a worker is connected (a pool killed with
``-9`` lets each worker finish its trial), and exits when the last one is gone. A worker whose
server does not answer starts its executors fresh, as a single worker does. ``HPO_FORKSERVER=0``
turns it off (for preload modules that are not safe to fork after import).

Protocol: ``SOCK_SEQPACKET`` socket pairs, one pickled tuple per message, file descriptors as
ancillary data. The pool's control connection: ``("worker",)`` with one end of a new worker's
pair. A worker's connection: first ``("ready",)`` once the preload is done; then
``("fork", env, cwd, preload)`` with the executor's end of its socket pair -> ``("forked", pid)``
or ``("error", reason)`` (the worker starts that executor fresh, and asks again for the next);
later ``("exit", pid, code)``, sent after the executor's process group was killed with it.

A module that initializes CUDA when imported cannot be used in forked processes: a server that
finds CUDA initialized after its preload answers every request with an error that says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from hpo_framework import defaults
from hpo_framework.runtime.executor import KILL_GRACE_S, import_preload, serve_forever

log = logging.getLogger("hpo.forkserver")

_MAIN = "hpo_framework.runtime._forkserver_main"  # python -m _MAIN FD [MODULE...]
_MAX_MESSAGE = 1 << 20  # a request: a worker's whole environment, many times over
_MAX_REPLY = 4096
#: Seconds a worker waits for a fork, once the server has finished its preload, before it
#: starts its executors fresh.
FORK_WAIT_S = 30.0


class ForkRefused(Exception):
    """The server could not fork this executor (a failed fork, CUDA initialized by the
    preload): this one is started fresh, the next is asked for again."""


def enabled() -> bool:
    """Whether a pool starts a fork server (``HPO_FORKSERVER``, default on)."""
    return os.environ.get(defaults.FORKSERVER_ENV, "1").strip().lower() not in ("0", "false", "no")


def _send(sock: socket.socket, message: tuple[Any, ...], fd: int | None = None) -> None:
    data = pickle.dumps(message)
    if fd is None:
        sock.sendall(data)
    else:
        socket.send_fds(sock, [data], [fd])


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


# --- the pool's side ---------------------------------------------------------------------------


class ForkServer:
    """The pool's handle: starts the server, hands each new worker a connection to it."""

    def __init__(self, preload: Sequence[str]) -> None:
        mine, theirs = _pair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", _MAIN, str(theirs.fileno()), *preload],
                pass_fds=[theirs.fileno()], start_new_session=True,
            )  # fmt: skip
        finally:
            theirs.close()
        self._control: socket.socket | None = mine

    def connect(self) -> socket.socket | None:
        """A new connection for one worker (its end; the server gets the other), or None if
        the server is gone (that worker then starts its executors fresh)."""
        if self._control is None:
            return None
        worker_end, server_end = _pair()
        try:
            _send(self._control, ("worker",), server_end.fileno())
        except OSError as e:
            log.warning("fork server gone (%s): new workers start their executors fresh", e)
            worker_end.close()
            self._control.close()
            self._control = None
            return None
        finally:
            server_end.close()
        return worker_end

    def forget(self) -> None:
        """In a forked worker: drop the inherited control connection (the pool keeps its own)."""
        if self._control is not None:
            self._control.close()
            self._control = None

    def close(self) -> None:
        """No more workers: the server exits once the connected ones are gone."""
        self.forget()
        try:
            self._proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:  # a worker of this pool outlives it: leave it served
            log.warning("fork server %d still serves a worker; leaving it", self._proc.pid)


# --- a worker's side ---------------------------------------------------------------------------


class ForkedProcess:
    """An executor forked by the server, with the part of ``subprocess.Popen`` that
    :class:`~hpo_framework.runtime.executor.ProcessExecutor` uses."""

    def __init__(self, pid: int, client: ForkClient) -> None:
        self.pid = pid
        self.returncode: int | None = None
        #: Reaped by the server, which killed its process group first (a server that died
        #: killed nothing: its executors died with it, their children may live on).
        self.group_killed = False
        self._client = client

    def poll(self) -> int | None:
        return self._settle(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._settle(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"executor {self.pid}", timeout or 0.0)
        return code

    def _settle(self, timeout: float | None) -> int | None:
        if self.returncode is None:
            self.returncode = self._client.exit_code(self.pid, timeout)
            self.group_killed = self.returncode is not None and not self._client.server_gone
        return self.returncode


class ForkClient:
    """A worker's connection to the pool's fork server."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._exits: dict[int, int] = {}
        self._ready = False
        self.server_gone = False

    def spawn(self, fd: int, preload: Sequence[str]) -> ForkedProcess:
        """An executor serving ``fd``; ForkRefused if the server could not fork this one,
        OSError if it is gone (or silent for :data:`FORK_WAIT_S`): then for good."""
        if self.server_gone:
            raise ConnectionError("the fork server is gone")
        message = ("fork", dict(os.environ), os.getcwd(), tuple(preload))
        try:
            while not self._ready:  # its preload: as long as the modules take to import
                self._receive(None)
            _send(self._sock, message, fd)
            deadline = time.monotonic() + FORK_WAIT_S
            while True:
                reply = self._receive(max(0.0, deadline - time.monotonic()))
                if reply is None:
                    raise TimeoutError(f"no answer from the fork server in {FORK_WAIT_S:g}s")
                if reply[0] == "error":
                    raise ForkRefused(reply[1])
                if reply[0] == "forked":
                    self._exits.pop(reply[1], None)  # an earlier process's, by that pid
                    return ForkedProcess(reply[1], self)
        except OSError:  # whatever it forks late for this request dies when this closes
            self.server_gone = True
            self._sock.close()
            raise

    def ready(self) -> bool:
        """Whether the server has finished its preload (without waiting for it)."""
        with contextlib.suppress(OSError):
            while not self._ready and not self.server_gone:
                if self._receive(0.0) is None:
                    break
        return self._ready or self.server_gone

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        """``pid``'s exit code once the server reaped it, waiting up to ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self._exits:
            if self.server_gone:  # its executors died with it (PR_SET_PDEATHSIG)
                return self._gone_with_server(pid, deadline)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                if self._receive(left) is None:
                    return None
            except OSError:
                self.server_gone = True
        return self._exits.pop(pid)

    def _receive(self, timeout: float | None) -> tuple[Any, ...] | None:
        """The next message (exits are kept aside and returned too); None on timeout."""
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(_MAX_REPLY)
        except (TimeoutError, BlockingIOError):
            return None
        if not data:
            raise ConnectionResetError("the fork server closed the connection")
        message: tuple[Any, ...] = pickle.loads(data)  # from the server this pool started
        if message[0] == "exit":
            self._exits[message[1]] = message[2]
        elif message[0] == "ready":
            self._ready = True
        return message

    @staticmethod
    def _gone_with_server(pid: int, deadline: float | None) -> int | None:
        while True:
            try:
                stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 - read at once
            except OSError:
                return -signal.SIGKILL
            if stat.rsplit(")", 1)[1].split()[0] == "Z":  # dead, its reaper asleep
                return -signal.SIGKILL
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.05)


_attached: ForkClient | None = None


def attach(sock: socket.socket) -> None:
    """In a pool's worker process: start executors through this connection."""
    global _attached
    _attached = ForkClient(sock)


def attached() -> ForkClient | None:
    """This process's connection to its pool's fork server, if it has one."""
    return _attached


# --- the server process ------------------------------------------------------------------------


class _Server:
    def __init__(self, control: socket.socket, refusal: str | None) -> None:
        self.refusal = refusal
        self.selector = selectors.DefaultSelector()
        self.control: socket.socket | None = control
        self.owners: dict[int, socket.socket | None] = {}  # executor pid -> its worker
        self.workers: set[socket.socket] = set()
        self.wake_r, self.wake_w = socket.socketpair()
        for s in (self.wake_r, self.wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.selector.register(control, selectors.EVENT_READ)

    def run(self) -> None:
        while self.control is not None or self.workers or self.owners:
            for key, _ in self.selector.select(timeout=1.0):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.wake_r:
                    with contextlib.suppress(BlockingIOError):
                        while sock.recv(4096):
                            pass
                elif sock is self.control:
                    self._from_pool(sock)
                else:
                    self._from_worker(sock)
            self._reap()

    def _from_pool(self, sock: socket.socket) -> None:
        data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 1)
        if not data:  # the pool is done (or gone): serve the connected workers to their end
            self.selector.unregister(sock)
            sock.close()
            self.control = None
            return
        for fd in fds:
            worker = socket.socket(fileno=fd)
            self.workers.add(worker)
            self.selector.register(worker, selectors.EVENT_READ)
            with contextlib.suppress(OSError):  # the first message on a fresh socket
                _send(worker, ("ready",))

    def _from_worker(self, sock: socket.socket) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 1)
        except OSError:
            data, fds = b"", []
        if not data:  # the worker is gone: so are its executors
            self.selector.unregister(sock)
            self.workers.discard(sock)
            sock.close()
            for pid, owner in self.owners.items():
                if owner is sock:
                    _kill_executor(pid)
                    self.owners[pid] = None
            return
        try:
            if self.refusal is not None:
                raise RuntimeError(self.refusal)
            _, env, cwd, preload = pickle.loads(data)  # from a worker of this pool
            pid = self._fork(fds[0], env, cwd, preload)
        except Exception as e:  # noqa: BLE001 - one request fails, never the server
            print(f"hpo fork server: cannot fork an executor: {e}", file=sys.stderr, flush=True)
            _reply(sock, ("error", f"cannot fork an executor: {e}"))
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.owners[pid] = sock
        _reply(sock, ("forked", pid))

    def _fork(self, fd: int, env: dict[str, str], cwd: str, preload: Sequence[str]) -> int:
        server = os.getpid()
        pid = os.fork()
        if pid:
            return pid
        try:  # the executor: nothing of the server's stays open in it
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            self.selector.close()
            for s in (self.wake_r, self.wake_w, self.control, *self.workers):
                if s is not None:
                    s.close()
            os.setsid()
            os.environ.clear()
            os.environ.update(env)
            os.chdir(cwd)
            _fresh_seeds()
            serve_forever(fd, server, preload)
        finally:
            os._exit(70)

    def _reap(self) -> None:
        while self.owners:
            try:  # which one ended, left unreaped: its pid cannot be reused meanwhile
                ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if ended is None:
                return
            pid = ended.si_pid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # what the session left in its group
            _, status = os.waitpid(pid, 0)
            owner = self.owners.pop(pid, None)
            if owner is not None:
                _reply(owner, ("exit", pid, os.waitstatus_to_exitcode(status)))


def _kill_executor(pid: int) -> None:
    """SIGKILL to an unreaped executor's group, or to it alone if it has not called setsid yet."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    except PermissionError:
        pass


def _reply(sock: socket.socket, message: tuple[Any, ...]) -> None:
    """Send to a worker without waiting: a stopped worker must not stall the server."""
    with contextlib.suppress(OSError):
        sock.send(pickle.dumps(message), socket.MSG_DONTWAIT)


def _cuda_started() -> str | None:
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and cuda.is_initialized():
        return (
            "a preloaded module initialized CUDA, which forked processes cannot use "
            f"(set {defaults.FORKSERVER_ENV}=0, or preload a module that does not)"
        )
    return None


def _fresh_seeds() -> None:
    """Give a forked executor the random state a new process would have: its own."""
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "seed"):
        torch.seed()


def serve(control_fd: int, preload: Sequence[str]) -> None:
    """The server process's whole life (``python -m`` :data:`_MAIN` ``FD [MODULE...]``)."""
    import_preload(preload, "hpo fork server")  # each executor retries a failed one
    refusal = _cuda_started()
    if refusal is not None:
        print(f"hpo fork server: {refusal}", file=sys.stderr, flush=True)
    try:
        _Server(socket.socket(fileno=control_fd), refusal).run()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
