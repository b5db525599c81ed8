"""A pool's fork server: the preload modules are imported once per host and every executor of
the pool is forked from that import. Real pools, real forks, real kills."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, make_config, run_cli, start_worker, write_config
from tests.pool_helpers import counts, create, trials, wait_until

PROBE = {"HPO_SESSION_MODULES": "tests.preload_probe,tests.sessions"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its parent is gone for this purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _fork_server_of(pool: int) -> int:
    out = subprocess.run(
        ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pool)], capture_output=True, text=True
    ).stdout
    [pid] = [int(line.split()[0]) for line in out.splitlines() if "_forkserver_main" in line]
    return pid


def _seen(tmp_path: Path) -> list[dict[str, Any]]:
    """What each trial's executor recorded, in the order the trials ended."""
    files = sorted(tmp_path.glob("process-*.json"), key=lambda p: float(p.stem.split("-")[2]))
    return [json.loads(p.read_text()) for p in files]


def _children_of(parent: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True
    ).stdout
    return [int(pid) for pid in out.split()]


def _tree(root: int) -> list[int]:
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(_children_of(pid))
    return found


@pytest.fixture
def pool_trees() -> Iterator[list[int]]:
    """Pools whose every process (workers, fork server, executors: each in a group of its
    own) is killed when the test ends, passed or failed: the shared fixture kills only the
    pool's group, after which its workers finish their trials and the server waits for them."""
    pools: list[int] = []
    yield pools
    for pool in pools:
        for pid in _tree(pool):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(("forkserver", "imports"), [("1", 1), ("0", 3)])
def test_a_pool_imports_its_preload_once_for_all_its_executors(
    forkserver: str, imports: int, pg_url: str, tmp_path: Path
) -> None:
    """``hpo-worker --processes 3 --preload MODULE``: with the fork server (the default) the
    module is imported once, and the three executors that ran the trials are forks of that
    import; with ``HPO_FORKSERVER=0`` each executor imports it itself."""
    log = tmp_path / "imports.log"
    config = make_config(session="tests.preload_probe:pid_slowly", study_={"n_trials": 12})
    created = run_cli(
        "hpo-coordinator", "create", str(write_config(tmp_path / "c.yaml", config)),
        url=pg_url, HPO_TEST_PRELOAD_LOG=str(tmp_path / "coordinator.log"), **PROBE,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    name = config["study"]["name"]
    pool = start_worker(
        "--processes", "3", "--preload", "tests.preload_probe", "--idle-exit", "2",
        url=pg_url, log=tmp_path / "pool.log", HPO_TEST_PRELOAD_LOG=str(log),
        HPO_FORKSERVER=forkserver, **PROBE,
    )  # fmt: skip
    assert pool.wait(timeout=180) == 0, (tmp_path / "pool.log").read_text()[-3000:]
    assert counts(pg_url, name) == {"COMPLETE": 12}
    importers = {int(line.split()[0]) for line in log.read_text().splitlines()}
    executors = {int(t.value) for t in trials(pg_url, name) if t.value is not None}
    assert len(log.read_text().splitlines()) == imports
    assert len(executors) == 3  # one executor per worker, each ran some of the trials
    if forkserver == "1":
        assert not importers & executors  # imported in the server, run in its forks
    else:
        assert importers == executors


def test_a_forked_executor_gets_its_worker_s_environment_and_fresh_seeds(
    pg_url: str, tmp_path: Path
) -> None:
    """``--gpus 0,1`` with numpy and torch preloaded in the server: each executor sees its own
    worker's ``CUDA_VISIBLE_DEVICES`` and working directory, leads its own process group, and
    draws different random numbers from NumPy's and torch's global generators, as two new
    processes would."""
    name = create(
        tmp_path, pg_url, session="tests.sessions:records_its_process",
        static={"dir": str(tmp_path), "sleep_s": 0.5}, study_={"n_trials": 8},
    )  # fmt: skip
    pool = start_worker(
        "--gpus", "0,1", "--preload", "numpy.random,torch", "--idle-exit", "2", url=pg_url,
        log=tmp_path / "pool.log",
    )  # fmt: skip
    assert pool.wait(timeout=180) == 0, (tmp_path / "pool.log").read_text()[-3000:]
    assert counts(pg_url, name) == {"COMPLETE": 8}
    seen = _seen(tmp_path)
    first: dict[int, dict[str, Any]] = {}  # the first trial of each executor: its first draw
    for s in seen:
        first.setdefault(s["pid"], s)
    assert {s["gpu"] for s in first.values()} == {"0", "1"}
    assert all(s["cwd"] == str(ROOT) and s["pgid"] == s["pid"] for s in seen)
    assert len({s["ppid"] for s in seen}) == 1  # all forked by the one server
    assert len({s["numpy"] for s in first.values()}) == len(first)
    assert len({s["torch"] for s in first.values()}) == len(first)


def test_a_crashed_or_timed_out_forked_executor_fails_only_its_trial(
    pg_url: str, tmp_path: Path
) -> None:
    """Through the fork server too: a segfault is reported with its signal, a hung session
    ends at ``trial_timeout`` with the children it left, and the next trials run in new forks."""
    crash = create(
        tmp_path, pg_url, name="crash", session="tests.sessions:segfaults",
        study_={"n_trials": 3, "max_retries": 0, "max_failed_trials": 20},
        enqueue=[{"x": -1.0}, {"x": 1.0}, {"x": 2.0}],
    )  # fmt: skip
    hang = create(
        tmp_path, pg_url, name="hang", session="tests.sessions:forks_and_hangs",
        static={"dir": str(tmp_path)}, enqueue=[{"x": -1.0}, {"x": 1.0}],
        study_={"n_trials": 2, "trial_timeout": 1, "max_retries": 0, "max_failed_trials": 20},
    )  # fmt: skip
    pool = start_worker(
        "--processes", "2", "--idle-exit", "2", url=pg_url, log=tmp_path / "pool.log"
    )
    assert pool.wait(timeout=180) == 0, (tmp_path / "pool.log").read_text()[-3000:]
    crashed = {t.params["x"]: t for t in trials(pg_url, crash)}
    assert crashed[-1.0].user_attrs["error"] == "session process killed by SIGSEGV"
    assert crashed[1.0].state.name == crashed[2.0].state.name == "COMPLETE"
    hung = {t.params["x"]: t for t in trials(pg_url, hang)}
    assert hung[-1.0].user_attrs["error"] == "trial_timeout of 1s exceeded"
    assert hung[1.0].state.name == "COMPLETE"
    child = int((tmp_path / "child.pid").read_text())
    wait_until("the hung session's child to be gone", lambda: not _alive(child))


def test_a_killed_worker_takes_its_forked_executor_with_it(
    pg_url: str, tmp_path: Path, pool_trees: list[int]
) -> None:
    """``kill -9`` of a pool's worker: the executor it had forked (not its child) goes at once,
    ten minutes before its session would end, and the replacement worker gets a new fork."""
    name = create(
        tmp_path, pg_url, session="tests.sessions:records_its_process",
        static={"dir": str(tmp_path), "sleep_s": 600},
        study_={"n_trials": 2, "heartbeat_interval": 1, "grace_period": 3},
    )  # fmt: skip
    pool = start_worker("--processes", "2", url=pg_url, log=tmp_path / "pool.log")
    pool_trees.append(pool.pid)
    wait_until("2 trials running", lambda: counts(pg_url, name).get("RUNNING", 0) == 2)
    server = _fork_server_of(pool.pid)
    executors = _children_of(server)
    workers = [pid for pid in _children_of(pool.pid) if pid != server]
    assert len(executors) == len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    wait_until("its executor gone", lambda: sum(map(_alive, executors)) == 1, timeout=10)
    wait_until("a new fork", lambda: len(set(_children_of(server)) - set(executors)) == 1)
    os.kill(pool.pid, signal.SIGTERM)  # then a cold stop: the other session is not waited for
    log = tmp_path / "pool.log"
    wait_until("the stop taken", lambda: log.read_text().count("received, finishing") == 2)
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.wait(timeout=60) != 0  # a trial abandoned
    wait_until("the fork server to exit", lambda: not _alive(server))
    assert not any(map(_alive, executors))


def test_a_pool_carries_on_without_its_fork_server(pg_url: str, tmp_path: Path) -> None:
    """The fork server killed mid-run: its executors die with it, their trials fail and are
    retried, and the workers start their executors fresh from then on."""
    name = create(
        tmp_path, pg_url, session="tests.sessions:records_its_process",
        static={"dir": str(tmp_path), "sleep_s": 1}, study_={"n_trials": 8},
    )  # fmt: skip
    pool = start_worker(
        "--processes", "2", "--idle-exit", "2", url=pg_url, log=tmp_path / "pool.log"
    )
    wait_until("a trial done", lambda: counts(pg_url, name).get("COMPLETE", 0) >= 2)
    server = _fork_server_of(pool.pid)
    os.kill(server, signal.SIGKILL)
    assert pool.wait(timeout=180) == 0, (tmp_path / "pool.log").read_text()[-3000:]
    assert counts(pg_url, name).get("COMPLETE") == 8
    text = (tmp_path / "pool.log").read_text()
    assert "no session process from the pool's fork server" in text
    parents = {s["ppid"] for s in _seen(tmp_path)}
    assert server in parents and len(parents) >= 2  # forked before, the workers' own after


def test_a_pool_killed_with_9_leaves_no_fork_server_behind(
    pg_url: str, tmp_path: Path, pool_trees: list[int]
) -> None:
    """``kill -9`` of the pool: its workers finish their trials and exit; the fork server,
    serving them to the end, exits after them."""
    name = create(
        tmp_path, pg_url, session="tests.sessions:records_its_process",
        static={"dir": str(tmp_path), "sleep_s": 2}, study_={"n_trials": 50},
    )  # fmt: skip
    pool = start_worker("--processes", "2", url=pg_url, log=tmp_path / "pool.log")
    pool_trees.append(pool.pid)
    wait_until("2 trials running", lambda: counts(pg_url, name).get("RUNNING", 0) == 2)
    server = _fork_server_of(pool.pid)
    pool_trees.append(server)  # the pool's tree loses it when the pool dies
    os.kill(pool.pid, signal.SIGKILL)
    pool.wait(timeout=30)
    wait_until("the fork server to exit", lambda: not _alive(server), timeout=120)
    c = counts(pg_url, name)
    assert c.get("RUNNING", 0) == 0 and c.get("FAIL", 0) == 0 and c["COMPLETE"] >= 2


def test_a_fork_server_that_cannot_fork_leaves_its_workers_to_start_executors_fresh(
    pg_url: str, tmp_path: Path
) -> None:
    """A fork that fails in the server (EAGAIN: the host out of processes) fails that request,
    not the server nor any trial: the worker says so and starts its executors itself."""
    name = create(
        tmp_path, pg_url, session="tests.sessions:records_its_process",
        static={"dir": str(tmp_path)}, study_={"n_trials": 4},
    )  # fmt: skip
    pool = start_worker(
        "--processes", "2", "--preload", "tests.fork_fails", "--idle-exit", "2", url=pg_url,
        log=tmp_path / "pool.log", HPO_SESSION_MODULES="tests.sessions,tests.fork_fails",
    )  # fmt: skip
    assert pool.wait(timeout=180) == 0, (tmp_path / "pool.log").read_text()[-3000:]
    assert counts(pg_url, name) == {"COMPLETE": 4}
    text = (tmp_path / "pool.log").read_text()
    assert "hpo fork server: cannot fork an executor: [Errno 11]" in text
    assert text.count("no session process from the pool's fork server") == 2  # one per worker
    seen = _seen(tmp_path)
    assert all(s["ppid"] != pool.pid for s in seen)  # each the child of its worker
    assert len({s["ppid"] for s in seen}) == 2
