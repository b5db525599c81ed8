"""Day-2 operations on a live study, as the README's "Operating a study" shows them: change its
limits, pause and resume, reopen, re-queue failed points, enqueue more, run in one process.
Each on SQLite and PostgreSQL, with real workers serving the study meanwhile."""

from __future__ import annotations

import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import optuna
import pytest
import yaml

from hpo_framework import run_hpo
from hpo_framework.operations.day2 import set_limits
from hpo_framework.storage.database import open_storage
from hpo_framework.storage.registry import Registry
from tests import sessions
from tests.conftest import make_config, run_cli, start_worker, write_config
from tests.pool_helpers import counts, create, create_sleepy, trials, wait_for_a_trial, wait_until


def coordinator(url: str, *args: str) -> tuple[int, str]:
    """Run ``hpo-coordinator ARGS``: (exit status, its output, stdout or else stderr)."""
    result = run_cli("hpo-coordinator", *args, url=url)
    return result.returncode, (result.stdout or result.stderr).strip()


def finished(url: str, name: str) -> int:
    c = counts(url, name)
    return c["COMPLETE"] + c["PRUNED"]


def test_set_changes_the_limits_of_a_live_study(storage_url: str, tmp_path: Path) -> None:
    name = create(tmp_path, storage_url, study_={"n_trials": 2})
    worker = start_worker(url=storage_url)
    wait_until("the first budget", lambda: finished(storage_url, name) == 2)
    # the worker waits for work; a raised budget is served at its next poll
    assert coordinator(storage_url, "set", name, "--n-trials", "5") == (
        0, "study 'pool': n_trials 2 -> 5"
    )  # fmt: skip
    wait_until("the raised budget", lambda: finished(storage_url, name) == 5, timeout=120)
    assert coordinator(storage_url, "set", name, "--n-trials", "3") == (
        2, "Error: n_trials 3 is below the 5 trials of study 'pool' that finished or are running"
    )  # fmt: skip
    status, out = coordinator(
        storage_url, "set", name, "--timeout", "none", "--max-failed-trials", "4",
        "--max-retries", "0",
    )  # fmt: skip
    assert status == 0 and out.splitlines() == [
        "study 'pool': max_failed_trials 10 -> 4",
        "study 'pool': max_retries 2 -> 0",
    ]  # fmt: skip (timeout was none already)
    assert coordinator(storage_url, "set", name, "--timeout", "3600") == (
        0, "study 'pool': timeout none -> 3600"
    )  # fmt: skip
    assert coordinator(storage_url, "set", name, "--timeout", "3600") == (  # restarts the clock
        0, "study 'pool': timeout 3600.0 -> 3600"
    )  # fmt: skip
    status, out = coordinator(storage_url, "set", name, "--max-retries", "none")
    assert status == 2 and out == (
        "Error: study 'pool': study.max_retries: must be an integer >= 0 (0: no retries), got null"
    )
    assert coordinator(storage_url, "set", name, "--n-trials", "[1")[0] == 2
    assert coordinator(storage_url, "set", name, "--n-trials", "ten")[0] == 2
    assert coordinator(storage_url, "set", name, "--n-trials", "ten")[1].startswith(
        "Error: study 'pool': study.n_trials: "
    )
    stored = json.loads(run_cli("hpo-inspect", name, "--format", "json", url=storage_url).stdout)
    assert stored["budget"] == 5 and stored["state"] == "done"
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0


def test_pause_lets_running_trials_finish_and_resume_goes_on(
    storage_url: str, tmp_path: Path
) -> None:
    name = create_sleepy(tmp_path, storage_url, 1, 5)
    worker = start_worker(url=storage_url)
    wait_for_a_trial(tmp_path)
    assert coordinator(storage_url, "pause", name)[0] == 0
    wait_until("the running trial to finish", lambda: counts(storage_url, name)["RUNNING"] == 0)
    done, started = finished(storage_url, name), len(list(tmp_path.glob("started-*")))
    assert done < 5 and done == started  # nothing failed: the running trial finished
    summary = json.loads(run_cli("hpo-inspect", name, "--format", "json", url=storage_url).stdout)
    assert summary["state"] == "paused"
    assert coordinator(storage_url, "reopen", name) == (
        2, "Error: cannot reopen study 'pool': it is paused: resume it"
    )  # fmt: skip
    path = tmp_path / f"{abs(hash('pool'))}.yaml"  # the config create() wrote
    assert coordinator(storage_url, "create", str(path), "--resume")[0] == 0
    assert (
        json.loads(run_cli("hpo-inspect", name, "--format", "json", url=storage_url).stdout)[
            "state"
        ]
        == "paused"
    )  # create --resume applies limits; only resume lifts a pause
    assert coordinator(storage_url, "resume", name) == (0, "study 'pool' resumed")
    wait_until("the budget", lambda: finished(storage_url, name) == 5, timeout=120)
    assert coordinator(storage_url, "resume", name) == (
        2, "Error: cannot resume study 'pool': it is not paused"
    )  # fmt: skip
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0


def test_reopen_a_failed_study_then_retry_its_failed_points(
    storage_url: str, tmp_path: Path
) -> None:
    name = create(
        tmp_path, storage_url, session="tests.sessions:raises",
        study_={"n_trials": 4, "max_failed_trials": 3, "max_retries": 0},
    )  # fmt: skip
    assert start_worker("--idle-exit", "1", url=storage_url).wait(timeout=120) == 0
    assert counts(storage_url, name) == {"FAIL": 3}
    assert coordinator(storage_url, "retry-failed", name) == (
        0, "study 'pool': re-queued 3 failed trial(s)"
    )  # fmt: skip
    assert coordinator(storage_url, "retry-failed", name) == (  # each failed point once
        0, "study 'pool': re-queued 0 failed trial(s)"
    )  # fmt: skip
    status, out = coordinator(storage_url, "reopen", name, "--reason", "fixed the data path")
    assert (status, out) == (0, "study 'pool' reopened; it was failed (max_failed_trials reached)")
    all_trials = trials(storage_url, name)
    failed = {t._trial_id: t.params for t in all_trials if t.state.name == "FAIL"}
    waiting = [t for t in all_trials if t.state.name == "WAITING"]
    assert sorted(failed) == sorted(t.system_attrs["hpo:requeued_from"] for t in waiting)
    for t in waiting:
        assert t.system_attrs["fixed_params"] == failed[t.system_attrs["hpo:requeued_from"]]
    summary = json.loads(run_cli("hpo-inspect", name, "--format", "json", url=storage_url).stdout)
    assert summary["state"] == "open"
    (reopened,) = summary["reopened"]
    assert reopened["was"] == "failed" and reopened["reason"] == "fixed the data path"
    table = run_cli("hpo-inspect", name, url=storage_url).stdout
    assert "(was failed: max_failed_trials reached): fixed the data path" in table


def test_enqueue_points_after_create(storage_url: str, tmp_path: Path) -> None:
    space = {"x": {"type": "float", "low": -5.0, "high": 5.0},
             "model": {"hidden": {"type": "int", "low": 1, "high": 4}}}  # fmt: skip
    name = create(tmp_path, storage_url, search_space=space, study_={"n_trials": 3})
    points = tmp_path / "points.yaml"
    points.write_text(yaml.safe_dump([{"x": 1.5, "model": {"hidden": 2}}, {"x": -1.0}]))
    assert coordinator(storage_url, "enqueue", name, str(points)) == (
        0, "study 'pool': enqueued 2 point(s)"
    )  # fmt: skip
    bad = tmp_path / "bad.yaml"
    bad.write_text("x: 9.0\n")
    status, out = coordinator(storage_url, "enqueue", name, str(bad))
    assert status == 2 and out.startswith(f"Error: {bad}: x: ") and "\n" not in out
    assert coordinator(storage_url, "enqueue", name, str(points)) == (
        2, "Error: 2 point(s) but the budget of study 'pool' leaves room for 1; raise it first "
        "(hpo-coordinator set NAME --n-trials N)",
    )  # fmt: skip
    assert start_worker("--idle-exit", "1", url=storage_url).wait(timeout=120) == 0
    params = [t.params for t in trials(storage_url, name)]
    assert params[:2] == [
        {"x": 1.5, "model.hidden": 2},
        {"x": -1.0, "model.hidden": params[1]["model.hidden"]},
    ]
    assert len(params) == 3


def test_parameters_the_session_asks_for_are_enqueued_and_copied_like_yaml_ones(
    storage_url: str, tmp_path: Path
) -> None:
    space = {"n_layers": {"type": "int", "low": 1, "high": 3}}
    config = make_config(
        session="tests.sessions:layers_by_run", search_space=space,
        study_={"n_trials": 2, "sampler": {"name": "random", "seed": 3}},
    )  # fmt: skip
    path = write_config(tmp_path / "c.yaml", config)
    run_hpo("tests.sessions:layers_by_run", path, storage_url)  # its trials asked units_l*, act
    point = tmp_path / "point.yaml"
    point.write_text("{n_layers: 2, units_l0: 8, units_l1: 64, act: tanh}\n")
    assert coordinator(storage_url, "set", "test-study", "--n-trials", "3")[0] == 0
    assert coordinator(storage_url, "enqueue", "test-study", str(point)) == (
        0, "study 'test-study': enqueued 1 point(s)"
    )  # fmt: skip
    for text, error in [
        ("{n_layers: 1, units_l0: 65}", "units_l0: 65 is outside this parameter's range (4..64)"),
        ("{n_layers: 1, unit_l0: 8}", "unknown key 'unit_l0'; did you mean 'units_l0'?"),
    ]:  # checked against the ranges the session asked with
        point.write_text(text)
        status, out = coordinator(storage_url, "enqueue", "test-study", str(point))
        assert status == 2 and out.endswith(error), out
    assert start_worker("--idle-exit", "1", url=storage_url).wait(timeout=120) == 0
    last = trials(storage_url, "test-study")[-1]
    assert last.params == {"n_layers": 2, "units_l0": 8, "units_l1": 64, "act": "tanh"}
    assert last.value == pytest.approx(0.72 + 0.5)
    # create --from keeps what the session asked for, with the ranges it asked with
    new = make_config(
        session="tests.sessions:layers_by_run", search_space=space,
        study_={"name": "again", "n_trials": 5},
    )  # fmt: skip
    status, out = coordinator(
        storage_url, "create", str(write_config(tmp_path / "n.yaml", new)), "--from", "test-study"
    )  # fmt: skip
    assert status == 0 and "3 trial(s) copied from 'test-study'" in out, out
    copied = {t.user_attrs["copied_from"]: t for t in trials(storage_url, "again")}
    original = trials(storage_url, "test-study")
    assert {k: (t.params, t.distributions) for k, t in copied.items()} == {
        f"test-study#{t.number}": (t.params, t.distributions) for t in original
    }


def test_run_runs_the_configs_session_in_this_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'run.db'}"
    path = write_config(tmp_path / "c.yaml", make_config(study_={"n_trials": 3}))
    result = run_cli("hpo-coordinator", "run", str(path), "--set", "study.n_trials=4", url=url)
    assert result.returncode == 0, result.stderr
    assert "progress 4/4" in result.stdout and "state done" in result.stdout
    study = optuna.load_study(study_name="test-study", storage=url)
    assert len(study.trials) == 4 and study.best_value >= 0


def test_stop_when_a_target_is_reached(storage_url: str, tmp_path: Path) -> None:
    config = make_config(
        study_={"n_trials": 20, "stop_when": {"target": 0.5}},
        enqueue=[{"x": 5.0}, {"x": 2.2}],  # 9.0, then 0.04: the target is met by trial 1
    )
    study = run_hpo(sessions.quadratic, write_config(tmp_path / "c.yaml", config), storage_url)
    assert len(study.trials) == 2
    table = run_cli("hpo-inspect", "test-study", url=storage_url).stdout
    assert "state stopped" in table
    assert "stopped: stop_when.target 0.5 reached by trial 1 (0.04)" in table


def test_stop_after_trials_without_improvement(storage_url: str, tmp_path: Path) -> None:
    config = make_config(
        study_={"n_trials": 20, "stop_when": {"patience": 3}, "sampler": "random"},
        enqueue=[{"x": 2.0}],  # the best there is: nothing after it improves
    )
    study = run_hpo(sessions.quadratic, write_config(tmp_path / "c.yaml", config), storage_url)
    assert len(study.trials) == 4
    summary = json.loads(
        run_cli("hpo-inspect", "test-study", "--format", "json", url=storage_url).stdout
    )
    assert summary["state"] == "stopped"
    assert summary["study_error"] == (
        "stop_when.patience: 3 finished trials without improvement since trial 0 (0)"
    )


def test_stop_when_mistakes_are_one_line(tmp_path: Path) -> None:
    for stop_when, two, reason in [
        ({"patience": 0}, False, "stop_when.patience: must be an integer >= 1 or null, got 0"),
        ({"target": "low"}, False, "stop_when.target: must be a finite number or null"),
        ({"goal": 1}, False, "stop_when.goal: unknown key 'goal'"),
        ({"target": 1}, True, "stop_when: needs a single objective"),
    ]:
        study: dict[str, object] = {"stop_when": stop_when}
        if two:
            study.update(direction=None, directions=["minimize", "maximize"])
        path = write_config(tmp_path / "c.yaml", make_config(study_=study))
        result = run_cli("hpo-coordinator", "check", str(path))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"Error: {path}: study.{reason}" in result.stderr


def test_create_from_copies_the_trials_that_fit_the_new_space(
    storage_url: str, tmp_path: Path
) -> None:
    old = make_config(study_={"n_trials": 8, "sampler": {"name": "random", "seed": 5}})
    run_hpo(sessions.quadratic, write_config(tmp_path / "old.yaml", old), storage_url)
    fitting = {
        t.number: t.value
        for t in trials(storage_url, "test-study")
        if t.state.name == "COMPLETE" and 0.0 <= t.params["x"] <= 5.0
    }
    assert 0 < len(fitting) < 8  # the seed gives both kinds
    new = make_config(
        search_space={"x": {"type": "float", "low": 0.0, "high": 5.0}},
        study_={"name": "narrower", "n_trials": 10},
    )
    path = write_config(tmp_path / "new.yaml", new)
    status, out = coordinator(storage_url, "create", str(path), "--from", "test-study")
    assert status == 0, out
    assert f"{len(fitting)} trial(s) copied from 'test-study'" in out
    copied = trials(storage_url, "narrower")
    assert {t.user_attrs["copied_from"]: t.value for t in copied} == {
        f"test-study#{n}": v for n, v in fitting.items()
    }
    assert start_worker("--idle-exit", "1", url=storage_url).wait(timeout=120) == 0
    assert counts(storage_url, "narrower")["COMPLETE"] == 10  # copies count towards n_trials
    small = write_config(tmp_path / "small.yaml", {**new, "study": {**new["study"], "name": "s",
                                                                  "n_trials": 1}})  # fmt: skip
    status, out = coordinator(storage_url, "create", str(small), "--from", "test-study")
    assert status == 2 and "study.n_trials: 1 leaves no room for the" in out
    grid = make_config(
        study_={"name": "g", "sampler": "grid"},
        search_space={"x": {"type": "float", "low": 0.0, "high": 5.0, "step": 1.0}},
    )
    path3 = write_config(tmp_path / "grid.yaml", grid)
    assert coordinator(storage_url, "create", str(path3), "--from", "test-study") == (
        2, "Error: create --from does not work with the grid sampler"
    )  # fmt: skip
    two = make_config(study_={"name": "two", "direction": None,
                              "directions": ["minimize", "maximize"]})  # fmt: skip
    path2 = write_config(tmp_path / "two.yaml", two)
    assert coordinator(storage_url, "create", str(path2), "--from", "test-study") == (
        2, "Error: cannot copy trials of study 'test-study': its directions (minimize) are not "
        "minimize, maximize",
    )  # fmt: skip


def test_inspect_workers_shows_live_and_lost_workers_and_what_they_run(
    storage_url: str, tmp_path: Path
) -> None:
    fast = {"HPO_PRESENCE_INTERVAL": "0.5"}  # lost after 1.5 s without a refresh
    # two trials: with one running, the study still has budget, so the other worker tries it
    # (a study with no budget left is not even loaded)
    name = create_sleepy(tmp_path, storage_url, 60, 2)
    busy = start_worker("--study", name, url=storage_url, **fast)
    wait_for_a_trial(tmp_path)
    elsewhere = start_worker(url=storage_url, HPO_SESSION_MODULES="experiments", **fast)

    def status() -> dict[str, dict[str, object]]:
        out = run_cli("hpo-inspect", "--workers", "--format", "json", url=storage_url, **fast)
        return {w["worker"].split(":")[1]: w for w in json.loads(out.stdout)}

    wait_until("both registered, one skipping", lambda: len(status()) == 2 and bool(
        status()[str(elsewhere.pid)]["cannot_serve"]))  # fmt: skip
    rows = status()
    mine, other = rows[str(busy.pid)], rows[str(elsewhere.pid)]
    assert mine["state"] == other["state"] == "live"
    assert mine["running"] == [f"{name}#0"] and mine["serves"] == name
    assert other["running"] == [] and other["serves"] == "all open studies"
    assert "outside the allowed prefixes (experiments)" in str(other["cannot_serve"][name])
    table = run_cli("hpo-inspect", "--workers", url=storage_url, **fast).stdout
    assert "2 live, 0 lost worker(s)" in table and f"{name}#0" in table
    busy.send_signal(signal.SIGKILL)  # lost: its row stays, no longer refreshed
    wait_until("the killed worker shown lost", lambda: status()[str(busy.pid)]["state"] == "lost")
    elsewhere.send_signal(signal.SIGTERM)  # a clean stop removes its row
    assert elsewhere.wait(timeout=60) == 0
    assert list(status()) == [str(busy.pid)]


def test_on_done_runs_once_per_end_and_again_after_the_budget_is_raised(
    storage_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "done.jsonl"
    hook = f"cat >> {out}; echo >> {out}"
    name = create(tmp_path, storage_url, study_={"n_trials": 4, "on_done": hook})
    allow = {"HPO_ALLOW_HOOK_COMMANDS": "1"}
    pool = start_worker("--processes", "2", "--idle-exit", "2", url=storage_url, **allow)
    assert pool.wait(timeout=120) == 0
    (event,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert event["event"] == "done" and event["study"] == name
    assert event["counts"]["COMPLETE"] == 4 and event["state"] == "done"
    assert coordinator(storage_url, "set", name, "--n-trials", "6")[0] == 0  # armed again
    pool = start_worker("--processes", "2", "--idle-exit", "2", url=storage_url, **allow)
    assert pool.wait(timeout=120) == 0
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["counts"]["COMPLETE"] for e in events] == [4, 6]


def test_on_failed_posts_to_a_url_and_commands_need_the_hosts_consent(
    storage_url: str, tmp_path: Path
) -> None:
    received: list[dict[str, object]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        name = create(
            tmp_path, storage_url, session="tests.sessions:raises",
            study_={"n_trials": 4, "max_failed_trials": 2, "on_failed": url,
                    "on_done": f"touch {tmp_path / 'never'}"},
        )  # fmt: skip
        log = tmp_path / "w.log"
        worker = start_worker("--idle-exit", "1", url=storage_url, log=log, HPO_HOOK_URLS=url)
        assert worker.wait(timeout=120) == 0
    finally:
        server.shutdown()
    (event,) = received
    assert event["event"] == "failed" and event["study"] == name and event["state"] == "failed"
    # a line chat webhooks show as the message, beside the summary's fields
    assert (
        event["text"].startswith(f"hpo: study {name!r} failed: ") and "2 failed" in event["text"]
    )
    # stop: nothing runs, so the stop itself ends the study; its command needs consent
    assert coordinator(storage_url, "reopen", name)[0] == 0
    stopped = run_cli("hpo-coordinator", "stop", name, url=storage_url)
    assert stopped.returncode == 0
    assert "on_done not run here: commands run only where HPO_ALLOW_HOOK_COMMANDS=1" in (
        stopped.stderr
    )
    assert not (tmp_path / "never").exists()
    # not claimed either: a process that may run commands still fires it, once
    allowed = run_cli("hpo-coordinator", "stop", name, url=storage_url)
    assert "was not open" in allowed.stdout
    from hpo_framework.runtime.hooks import fire_if_ended
    from hpo_framework.storage.backend import Backend
    from hpo_framework.storage.registry import Registry

    storage = open_storage(storage_url, create_schema=False)
    study_id = Registry(storage.engine).get(name).study_id
    os.environ["HPO_ALLOW_HOOK_COMMANDS"] = "1"
    try:
        fire_if_ended(Backend(storage), study_id)
        fire_if_ended(Backend(storage), study_id)
    finally:
        del os.environ["HPO_ALLOW_HOOK_COMMANDS"]
    assert (tmp_path / "never").exists()


def test_two_operators_setting_different_limits_at_once_both_land(
    storage_url: str, tmp_path: Path
) -> None:
    name = create(tmp_path, storage_url, study_={"n_trials": 2})
    storage = open_storage(storage_url, create_schema=False)
    for round_ in range(5):
        barrier = threading.Barrier(2)

        def change(limits: dict[str, int], barrier: threading.Barrier) -> None:
            barrier.wait()
            set_limits(storage, name, limits)

        threads = [
            threading.Thread(target=change, args=({"n_trials": 10 + round_}, barrier)),
            threading.Thread(target=change, args=({"max_retries": round_}, barrier)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        record = Registry(storage.engine).get(name)
        assert record.budget == 10 + round_
        assert record.config["study"]["n_trials"] == 10 + round_
        assert record.config["study"]["max_retries"] == round_
