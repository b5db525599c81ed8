"""The container path of docs/DEPLOYMENT.md, run for real: a Docker engine, the image,
`docker compose`.

The engine, the base images and the project image come from the scripts the docs'
development section names (scripts/docker-engine, docker-base-images, docker-image), so this
tier runs on a bare Debian host as root, and on any machine with a working engine. Each
command below is the docs', run as written; only the environment differs: a project name
of the test's own (COMPOSE_PROJECT_NAME, so a user's `hpo` project is never touched) and a
free dashboard port. Without an engine this tier skips locally and fails under CI=true.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, cli_env, free_port, missing_service, run_cli
from tests.pool_helpers import wait_until

pytestmark = pytest.mark.slow

N_TRIALS = 8
SMALL = ["--set", f"study.n_trials={N_TRIALS}", "--set", "static.epochs=3"]


def _engine_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def _script(name: str, timeout: float) -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / name)], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        missing_service(f"scripts/{name} failed: {result.stderr[-2000:]}")


@pytest.fixture(scope="session")
def docker_image() -> Iterator[str]:
    """A running engine with compose, the base images, and hpo:latest built from this tree."""
    if os.environ.get("HPO_SKIP_CONTAINERS") == "1":  # the README's way out, never under CI
        missing_service("HPO_SKIP_CONTAINERS=1: the container tier is not run")
    started_engine = False
    if not _engine_answers():
        if os.geteuid() != 0:
            missing_service("no Docker engine answers, and scripts/docker-engine needs root")
        _script("docker-engine", timeout=900)
        started_engine = True
    _script("docker-base-images", timeout=1800)
    _script("docker-image", timeout=1800)
    yield "hpo:latest"
    if started_engine:  # stop only what this run started
        subprocess.run([str(ROOT / "scripts" / "docker-engine"), "stop"], timeout=120)


class Compose:
    """`docker compose` in the repository, under a project name of this test's own."""

    def __init__(self) -> None:
        self.project = f"hpo-test-{uuid.uuid4().hex[:8]}"
        self.dashboard_port = free_port()
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": self.project,
            "DASHBOARD_PORT": str(self.dashboard_port),
        }
        self.env.pop("HPO_STORAGE", None)

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["docker", "compose", *args], cwd=ROOT, env=self.env,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        assert result.returncode == 0, f"docker compose {' '.join(args)}:\n{result.stderr}"
        return result

    def containers(self, *service: str) -> list[dict[str, Any]]:
        out = self("ps", "-a", "--format", "json", *service).stdout
        # compose prints one JSON object per line (2.21+) or one JSON list (older)
        text = out.strip()
        if not text:
            return []
        if text.startswith("["):
            return list(json.loads(text))
        return [json.loads(line) for line in text.splitlines()]

    def summary(self, study: str) -> dict[str, Any]:
        out = self("run", "--rm", "inspect", study, "--format", "json").stdout
        return dict(json.loads(out))

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in ("ps -a", "network ls", "volume ls"):
            result = subprocess.run(
                ["docker", *kind.split(), "-q", "--filter", label],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            found += [f"{kind.split()[0]} {line}" for line in result.stdout.split()]
        return found


@pytest.fixture(scope="module")
def compose(docker_image: str) -> Iterator[Compose]:
    project = Compose()
    try:
        yield project
    finally:  # whatever the test did, nothing of this project stays behind
        subprocess.run(
            ["docker", "compose", "down", "-v", "--remove-orphans", "--timeout", "5"],
            cwd=ROOT, env=project.env, capture_output=True, timeout=300,
        )  # fmt: skip


def _done(summary: dict[str, Any]) -> bool:
    c = summary["counts"]
    return bool(c["COMPLETE"] + c["PRUNED"] >= N_TRIALS and c["RUNNING"] == 0)


def _assert_no_trial_failed_but_by_its_session(summary: dict[str, Any]) -> None:
    """The example's SGD diverges for some learning rates and returns NaN, which fails its
    trial (and is retried); no trial may fail for any other reason (a stop, a lost worker)."""
    failed = [t for t in summary["trials"] if t["state"] == "FAIL"]
    assert all("not a finite number" in (t["error"] or "") for t in failed), failed


def test_the_readme_container_path_runs_the_exact_budget(compose: Compose) -> None:
    compose("up", "-d", "--scale", "worker=4")
    workers = compose.containers("worker")
    assert len(workers) == 4 and {w["State"] for w in workers} == {"running"}

    created = compose("run", "--rm", "coordinator", "create", "config.yaml", *SMALL)
    assert created.stdout.splitlines()[-1] == "linear-regression"

    summary: dict[str, Any] = {}

    def finished() -> bool:
        nonlocal summary
        summary = compose.summary("linear-regression")
        return _done(summary)

    wait_until("the study's budget", finished, timeout=900, every=2)
    counts = summary["counts"]
    assert counts["COMPLETE"] + counts["PRUNED"] == N_TRIALS
    assert counts["RUNNING"] == counts["WAITING"] == 0
    _assert_no_trial_failed_but_by_its_session(summary)
    assert summary["state"] == "done"
    hosts = {worker.split(":")[0] for worker in summary["workers"]}
    assert len(hosts) >= 3, summary["workers"]  # trials spread over the worker containers
    # the image's HEALTHCHECK (hpo-worker --check) finds every worker alive
    ids = [w["ID"] for w in compose.containers("worker")]

    def healthy() -> bool:
        out = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Health.Status}}", *ids],
            capture_output=True, text=True, timeout=60,
        ).stdout.split()  # fmt: skip
        return out == ["healthy"] * len(ids)

    wait_until("healthy workers", healthy, timeout=180, every=3)


def test_stopping_the_workers_finishes_their_trials_and_exits_0(compose: Compose) -> None:
    compose("up", "-d", "--scale", "worker=4")
    compose(
        "run", "--rm", "coordinator", "create", "config.yaml", "--name", "stop-check",
        "--set", "study.n_trials=200", "--set", "static.epochs=3",
    )  # fmt: skip
    wait_until(
        "trials running in every worker",
        lambda: compose.summary("stop-check")["counts"]["RUNNING"] >= 2,
        timeout=300,
        every=1,
    )
    started = time.monotonic()
    compose("stop", "worker", timeout=120)
    took = time.monotonic() - started
    workers = compose.containers("worker")
    assert [w["ExitCode"] for w in workers] == [0, 0, 0, 0], workers
    assert took < 10, f"docker compose stop worker took {took:.1f}s"
    summary = compose.summary("stop-check")
    counts = summary["counts"]
    assert counts["RUNNING"] == 0, counts  # every started trial finished
    assert counts["COMPLETE"] + counts["PRUNED"] >= 2
    # A trial may fail on its own (the example's SGD diverges for some learning rates and
    # returns NaN); none may fail because its worker stopped.
    _assert_no_trial_failed_but_by_its_session(summary)
    compose("run", "--rm", "coordinator", "stop", "stop-check")  # later tests start workers


def test_create_reads_any_config_in_the_project_folder(compose: Compose) -> None:
    second = ROOT / f".test-second-{compose.project}.yaml"
    text = (ROOT / "config.yaml").read_text().replace("name: linear-regression", "name: second")
    assert "name: second" in text
    second.write_text(text)
    try:
        created = compose("run", "--rm", "coordinator", "create", second.name, *SMALL)
    finally:
        second.unlink()
    assert created.stdout.splitlines()[-1] == "second"
    summary = compose.summary("second")
    assert summary["budget"] == N_TRIALS and summary["session"] == (
        "experiments.linear_regression:single_session"
    )
    compose("run", "--rm", "coordinator", "stop", "second")  # nothing serves it here


def test_a_killed_worker_container_s_trial_resumes_from_the_shared_checkpoint(
    compose: Compose,
) -> None:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["study"].update(
        name="ckpt-check", n_trials=1, heartbeat_interval=1, grace_period=5,
        pruner={"name": "none"},
    )  # fmt: skip
    # about a second per epoch here: 80,000 training rows in batches of 16
    config["static"].update(epochs=20, data={**config["static"]["data"], "n_samples": 100_000})
    config["enqueue"] = [
        {"lr": 0.001, "batch_size": 16, "optimizer": "adam", "weight_decay": 0.0,
         "model": {"hidden": 16}},
    ]  # fmt: skip
    config["checkpoints"] = {"dir": "/checkpoints"}
    path = ROOT / f".test-ckpt-{compose.project}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # when: names one above it
    try:
        compose("up", "-d", "--scale", "worker=1")
        compose("run", "--rm", "coordinator", "create", path.name)
    finally:
        path.unlink()

    def epochs_of(number: int) -> list[int]:
        out = compose("run", "--rm", "inspect", "ckpt-check", "--trial", str(number),
                      "--format", "json").stdout  # fmt: skip
        return sorted(int(step) for step in json.loads(out)["intermediate_values"])

    wait_until("two epochs of the first attempt", lambda: len(epochs_of(0)) >= 2, timeout=600)
    compose("kill", "worker")  # SIGKILL: no trial is finished, no ticket handed back
    reached = len(epochs_of(0))
    assert reached < 20, "the trial ended before its worker was killed; make its epochs longer"
    compose("up", "-d", "--scale", "worker=1")
    wait_until(
        "the retry to finish",
        lambda: compose.summary("ckpt-check")["counts"]["COMPLETE"] == 1,
        timeout=600, every=2,
    )  # fmt: skip
    trials = compose.summary("ckpt-check")["trials"]
    (done,) = [t["number"] for t in trials if t["state"] == "COMPLETE"]
    retried = epochs_of(done)
    # the retry started where the killed attempt's last checkpoint left off (saved just before
    # its epoch was reported, so one further if the kill fell in between), and ran the rest
    assert retried[0] in (reached, reached + 1), (reached, retried)
    assert retried == list(range(retried[0], 20))
    left = compose("run", "--rm", "--entrypoint", "find", "worker", "/checkpoints",
                   "-name", "*.pkl").stdout  # fmt: skip
    assert left.strip() == ""  # a finished point's checkpoint goes
    compose("stop", "worker")


def test_dashboard_serves_the_studies_and_stops_on_sigterm(compose: Compose) -> None:
    compose("up", "-d", "--scale", "dashboard=1", "dashboard")
    studies = _dashboard_studies(compose)
    assert {"linear-regression", "stop-check"} <= studies
    compose("stop", "dashboard")
    # stop_grace_period is 2s: exit 0 (not 137) means it ended on SIGTERM within that.
    (dashboard,) = compose.containers("dashboard")
    assert dashboard["ExitCode"] == 0, dashboard


def _dashboard_studies(compose: Compose) -> set[str]:
    url = f"http://127.0.0.1:{compose.dashboard_port}/api/studies"
    body: dict[str, Any] = {}

    def serving() -> bool:
        nonlocal body
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.loads(response.read())
                return bool(response.status == 200)
        except OSError:
            return False

    wait_until("the dashboard's study API", serving, timeout=120, every=0.5)
    return {s["study_name"] for s in body["study_summaries"]}


def test_host_side_commands_through_the_published_port(compose: Compose) -> None:
    port = free_port()
    compose.env["POSTGRES_HOST_PORT"] = str(port)
    compose("-f", "docker-compose.yml", "-f", "docker-compose.db-port.yml", "up", "-d", "postgres")
    (pg,) = compose.containers("postgres")
    assert f"127.0.0.1:{port}->5432/tcp" in pg["Ports"]
    url = f"postgresql+psycopg2://hpo:hpo-dev-only@127.0.0.1:{port}/hpo"

    def listed() -> bool:
        result = run_cli("hpo-inspect", "--format", "json", url=url)
        return result.returncode == 0 and "linear-regression" in result.stdout

    wait_until("hpo-inspect on the host", listed, timeout=120, every=1)  # data kept in pgdata


def test_the_pgbouncer_profile_serves_the_workers_over_two_server_connections(
    docker_image: str,
) -> None:
    """The PgBouncer line of docs/DEPLOYMENT.md, in a project of its own: PgBouncer (Debian's
    package, built from deploy/pgbouncer) in transaction mode with 2 server connections in front of
    PostgreSQL, three workers and the coordinator through it, the exact budget."""
    project = Compose()
    project.env.update(POSTGRES_HOST="pgbouncer", POSTGRES_PORT="6432", PGBOUNCER_POOL_SIZE="2")
    profile = ("--profile", "pgbouncer")
    try:
        project(*profile, "up", "-d", "--scale", "worker=3", timeout=900)
        project("run", "--rm", "coordinator", "create", "config.yaml", *SMALL)
        summary: dict[str, Any] = {}

        def finished() -> bool:
            nonlocal summary
            summary = project.summary("linear-regression")
            return _done(summary)

        wait_until("the study's budget", finished, timeout=900, every=2)
        assert summary["counts"]["COMPLETE"] + summary["counts"]["PRUNED"] == N_TRIALS
        _assert_no_trial_failed_but_by_its_session(summary)
        logs = project("logs", "worker").stdout
        assert "set per transaction" in logs and "Traceback" not in logs
        connections = project(
            "exec", "-T", "postgres", "psql", "-U", "hpo", "-d", "hpo", "-Atc",
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'hpo' "
            "AND pid <> pg_backend_pid() AND application_name <> 'pg_isready'",
        ).stdout  # fmt: skip
        assert int(connections.strip()) <= 2  # every client went through the pooler's two
    finally:
        subprocess.run(
            ["docker", "compose", *profile, "down", "-v", "--remove-orphans", "--timeout", "5"],
            cwd=ROOT, env=project.env, capture_output=True, timeout=300,
        )  # fmt: skip
    assert project.leftovers() == []


def test_down_leaves_nothing_behind(compose: Compose) -> None:
    compose("up", "-d", "--scale", "worker=2", "--scale", "dashboard=1")
    compose("down", "-v", timeout=300)
    assert compose.leftovers() == []
    # On the fresh, empty database the dashboard serves at once (no crash loop before the
    # first study), and a plain `down -v` removes it with the rest.
    compose("up", "-d", "--scale", "dashboard=1", "dashboard")
    assert _dashboard_studies(compose) == set()
    (dashboard,) = compose.containers("dashboard")
    assert dashboard["State"] == "running" and "Restarting" not in dashboard["Status"]
    compose("down", "-v", timeout=300)
    assert compose.leftovers() == []


def _in_image(image: str, *command: str) -> str:
    result = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", command[0], image, *command[1:]],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_image_runs_as_non_root(docker_image: str) -> None:
    assert int(_in_image(docker_image, "id", "-u")) != 0


def test_the_image_has_the_package_and_its_commands(docker_image: str) -> None:
    assert _in_image(docker_image, "hpo-coordinator", "--version") == (
        run_cli("hpo-coordinator", "--version").stdout
    )


def test_override_files_validate(docker_image: str) -> None:
    for override in ("docker-compose.gpu.yml", "docker-compose.db-port.yml"):
        result = subprocess.run(
            ["docker", "compose", "-f", "docker-compose.yml", "-f", override, "config", "-q"],
            cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, f"{override}: {result.stderr}"


def _docker(*args: str, timeout: float = 300, check: bool = True) -> str:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout
    )  # fmt: skip
    assert result.returncode == 0 or not check, f"docker {' '.join(args)}:\n{result.stderr}"
    return result.stdout.strip()


@pytest.fixture
def swarm(docker_image: str) -> Iterator[str]:
    """A single-node swarm on this engine, its node labelled for the database as the docs
    says; left as it was found (a swarm this test made is left, a label it added removed)."""
    made = _docker("info", "--format", "{{.Swarm.LocalNodeState}}") != "active"
    bridge = "docker_gwbridge"  # the network `swarm init` makes for its containers' egress
    had_bridge = bool(_docker("network", "ls", "-q", "--filter", f"name=^{bridge}$"))
    if made:
        _docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    node = _docker("info", "--format", "{{.Swarm.NodeID}}")
    labels = _docker("node", "inspect", node, "--format", "{{json .Spec.Labels}}")
    labelled = '"hpo-db"' in labels
    _docker("node", "update", "--label-add", "hpo-db=true", node)
    try:
        yield node
    finally:
        # Another run's stack on this engine keeps the swarm and its label (without them its
        # postgres task would be rejected from the node).
        if not _docker("stack", "ls", "--format", "{{.Name}}", check=False):
            if made:
                _docker("swarm", "leave", "--force", check=False)
                if not had_bridge:
                    _docker("network", "rm", bridge, check=False)
            elif not labelled:
                _docker("node", "update", "--label-rm", "hpo-db", node, check=False)


class Stack:
    """``docker stack deploy -c deploy/swarm/docker-stack.yml`` under a name of its own."""

    def __init__(self, tmp: Any) -> None:
        self.name = f"hpotest{uuid.uuid4().hex[:6]}"
        self.env = {
            **os.environ, "HPO_IMAGE": "hpo:latest", "POSTGRES_PASSWORD": uuid.uuid4().hex,
            "HPO_WORKERS": "3", "HPO_CHECKPOINT_KEY": uuid.uuid4().hex,
        }  # fmt: skip
        # The documented command, and the test's small study on top (a second -c file).
        self.small = tmp / "small.yml"
        command = ["create", "config.yaml", "--resume", *SMALL]
        self.small.write_text(
            yaml.safe_dump({"version": "3.8", "services": {"coordinator": {"command": command}}})
        )

    def deploy(self) -> None:
        result = subprocess.run(
            ["docker", "stack", "deploy", "-c", "deploy/swarm/docker-stack.yml",
             "-c", str(self.small), self.name],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr

    def in_a_worker(self, *command: str) -> str:
        """Run a command in one of the stack's worker containers that stays: a task a
        scale-down is stopping still runs (finishing its trial), and goes, exec and all."""
        service = f"{self.name}_worker"
        staying = _docker(
            "service", "ps", "-q", "--no-trunc", "--filter", "desired-state=running", service
        ).split()
        for task in staying:
            label = f"label=com.docker.swarm.task.id={task}"
            ids = _docker("ps", "-q", "--filter", label, "--filter", "status=running").split()
            if ids:
                return _docker("exec", ids[0], *command)
        raise AssertionError("no running worker container")

    def summary(self, study: str) -> dict[str, Any]:
        try:
            return dict(json.loads(self.in_a_worker("hpo-inspect", study, "--format", "json")))
        except AssertionError:  # not created yet, or no worker container yet
            return {}

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.stack.namespace={self.name}"
        found = []
        for kind in ("service ls", "ps -a", "network ls", "volume ls"):
            out = _docker(*kind.split(), "-q", "--filter", label, check=False)
            found += [f"{kind.split()[0]} {line}" for line in out.split()]
        return found

    def remove(self) -> None:
        """As docs/DEPLOYMENT.md says: the workers first (they finish or hand back their trials
        while the database is still up; swarm stops a stack's services all at once), then the
        rest."""
        _docker("service", "scale", f"{self.name}_worker=0", timeout=900, check=False)
        _docker("stack", "rm", self.name, check=False)
        label = f"label=com.docker.stack.namespace={self.name}"
        wait_until(
            "the stack's containers and networks to go",
            lambda: not _docker("ps", "-aq", "--filter", label, check=False)
            and not _docker("network", "ls", "-q", "--filter", label, check=False),
            timeout=300, every=1,
        )  # fmt: skip
        for volume in _docker("volume", "ls", "-q", "--filter", label, check=False).split():
            _docker("volume", "rm", volume, check=False)


def test_the_swarm_stack_runs_the_exact_budget_and_scales_down_gracefully(
    swarm: str, tmp_path: Any
) -> None:
    """The Swarm steps of docs/DEPLOYMENT.md on a single-node swarm: deploy, the coordinator's
    study done with its exact budget over the worker tasks, a scale-down whose stopped tasks
    finish their running trials, and `docker stack rm` (plus the data volume) leaving nothing."""
    stack = Stack(tmp_path)
    try:
        stack.deploy()
        summary: dict[str, Any] = {}

        def finished() -> bool:
            nonlocal summary
            summary = stack.summary("linear-regression")
            return bool(summary) and _done(summary)

        wait_until("the stack's study", finished, timeout=900, every=3)
        counts = summary["counts"]
        assert counts["COMPLETE"] + counts["PRUNED"] == N_TRIALS and counts["RUNNING"] == 0
        _assert_no_trial_failed_but_by_its_session(summary)

        stack.in_a_worker(
            "hpo-coordinator", "create", "config.yaml", "--name", "scale-down",
            "--set", "study.n_trials=200", "--set", "static.epochs=3",
        )  # fmt: skip
        wait_until(
            "trials running in the worker tasks",
            lambda: stack.summary("scale-down").get("counts", {}).get("RUNNING", 0) >= 2,
            timeout=300, every=1,
        )  # fmt: skip
        _docker("service", "scale", f"{stack.name}_worker=1", timeout=900)
        stack.in_a_worker("hpo-coordinator", "stop", "scale-down")
        wait_until(
            "the running trials to finish",
            lambda: stack.summary("scale-down")["counts"]["RUNNING"] == 0,
            timeout=300, every=1,
        )  # fmt: skip
        summary = stack.summary("scale-down")
        assert summary["counts"]["COMPLETE"] + summary["counts"]["PRUNED"] >= 2
        _assert_no_trial_failed_but_by_its_session(summary)  # none lost to the scale-down

        # The two stopped tasks' workers left the worker registry on their way out (a killed
        # one stays there, shown as lost): one live worker is left.
        def workers() -> list[dict[str, Any]]:
            out = stack.in_a_worker("hpo-inspect", "--workers", "--format", "json")
            return list(json.loads(out))

        wait_until("the stopped workers to leave", lambda: len(workers()) == 1, timeout=300)
        assert [w["state"] for w in workers()] == ["live"]
    finally:
        stack.remove()
    assert stack.leftovers() == []
