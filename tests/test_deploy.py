"""Dockerfile, docker-compose.yml, the Swarm stack and the Kubernetes manifests keep their
contract; and the compose file's own commands run the pool (as local processes: no Docker
engine runs on the test machines)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from tests.conftest import BIN, ROOT, cli_env
from tests.pool_helpers import counts, wait_until

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR:-default} / ${VAR:?error} / $$ interpolation, as `docker compose` does."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    text = re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", sub, value)
    return text.replace("$$", "$")


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
         "docker-compose.yml", "docker-compose.gpu.yml"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_worker_service_scales() -> None:
    worker = SERVICES["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["build"] == "." and worker["entrypoint"] == ["hpo-worker"]
    assert worker["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert worker["restart"] == "unless-stopped"
    assert worker["stop_signal"] == "SIGTERM" and worker["stop_grace_period"] == "10m"
    assert "postgres:5432" in worker["environment"]["HPO_STORAGE"]
    assert "./experiments:/app/experiments:ro" in worker["volumes"]


def test_postgres_service() -> None:
    pg = SERVICES["postgres"]
    assert re.fullmatch(r"postgres:\d+", pg["image"])
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert pg["volumes"] == ["pgdata:/var/lib/postgresql/data"] and "pgdata" in COMPOSE["volumes"]
    assert pg["environment"]["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:-hpo-dev-only}"


def test_every_published_port_is_on_loopback_only() -> None:
    published = [(name, p) for name, s in SERVICES.items() for p in s.get("ports", [])]
    assert {name for name, _ in published} == {"postgres", "dashboard"}
    assert all(p.startswith("127.0.0.1:") for _, p in published)


def test_tools_run_under_profiles() -> None:
    assert SERVICES["coordinator"]["profiles"] == ["tools"]
    assert SERVICES["coordinator"]["command"] == ["create", "config.yaml"]
    assert SERVICES["inspect"]["profiles"] == ["tools"]
    assert SERVICES["dashboard"]["profiles"] == ["dashboard"]
    assert "optuna-dashboard" in " ".join(SERVICES["dashboard"]["entrypoint"])


def test_gpu_override_reserves_one_gpu_per_worker() -> None:
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]["worker"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert "cu" in gpu["build"]["args"]["TORCH_INDEX_URL"]


def test_no_secret_is_hard_coded() -> None:
    texts = {
        p.relative_to(ROOT): p.read_text()
        for p in [
            ROOT / "docker-compose.yml",
            ROOT / "Dockerfile",
            *(ROOT / "deploy").rglob("*.y*ml"),
        ]
    }
    for path, text in texts.items():
        for line in text.splitlines():
            if line.lstrip().startswith("#"):  # usage notes show placeholders like "=..."
                continue
            if (
                re.search(r"PASSWORD\s*[:=]\s*\S", line)
                and "${" not in line
                and "secretKeyRef" not in line
            ):
                pytest.fail(f"{path}: hard-coded password: {line.strip()}")
    assert "secret.env" in (ROOT / ".gitignore").read_text()


def test_dockerfile_contract() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert re.match(r"FROM python:3\.\d+-slim$", lines[0])
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines
    first_source_copy = next(
        i for i, line in enumerate(lines) if line.startswith("COPY hpo_framework")
    )
    deps = next(i for i, line in enumerate(lines) if ".[samplers,dashboard]" in line)
    assert deps < first_source_copy  # dependencies cached in a layer before the source
    assert any(line.startswith("USER ") and line != "USER root" for line in lines)
    assert lines[-1] == 'ENTRYPOINT ["hpo-worker"]'
    assert ".venv" in (ROOT / ".dockerignore").read_text()


def test_kubernetes_manifests() -> None:
    docs: dict[str, dict[str, Any]] = {}
    for path in (ROOT / "deploy" / "k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{doc['kind']}/{doc.get('metadata', {}).get('name', '')}"] = doc
    worker = docs["Deployment/hpo-worker"]["spec"]
    assert worker["replicas"] >= 2
    pod = worker["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 60 and pod["securityContext"]["runAsNonRoot"]
    env = pod["containers"][0]["env"][0]
    assert env["name"] == "HPO_STORAGE" and env["valueFrom"]["secretKeyRef"]["name"] == "hpo-db"
    job = docs["Job/hpo-coordinator"]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"][:3] == ["hpo-coordinator", "create", "config.yaml"]
    assert docs["StatefulSet/hpo-postgres"]["spec"]["volumeClaimTemplates"]
    kustomization = docs["Kustomization/"]
    assert set(kustomization["resources"]) == {
        "namespace.yaml",
        "postgres.yaml",
        "worker.yaml",
        "coordinator-job.yaml",
    }


def test_swarm_stack_renders_with_docker_stack_config() -> None:
    if shutil.which("docker") is None:  # the CLI alone renders stacks; no engine is needed
        message = "the docker CLI is not installed; it validates deploy/swarm/docker-stack.yml"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    env = {**os.environ, "HPO_IMAGE": "registry.example.com/hpo:1", "POSTGRES_PASSWORD": "x"}
    result = subprocess.run(
        ["docker", "stack", "config", "-c", "deploy/swarm/docker-stack.yml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]
    assert rendered["worker"]["deploy"]["replicas"] == 4
    assert rendered["worker"]["stop_grace_period"] == "10m0s"


def test_compose_commands_run_the_pool_as_local_processes(
    pg_admin: sa.Engine, tmp_path: Path
) -> None:
    """4 workers, the coordinator and inspect, each with the exact command and environment
    docker-compose.yml gives it; only the host `postgres` maps to this machine's server."""
    database = f"hpo_compose_{os.getpid()}"
    with pg_admin.connect() as conn:
        if not conn.execute(sa.text("select 1 from pg_roles where rolname = 'hpo'")).first():
            conn.execute(sa.text("CREATE ROLE hpo LOGIN PASSWORD 'hpo-dev-only'"))
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{database}" OWNER hpo'))
    local = sa.engine.make_url(str(pg_admin.url))

    def service(name: str, *extra: str) -> tuple[list[str], dict[str, str]]:
        spec = SERVICES[name]
        env = {
            k: interpolate(v, {"POSTGRES_DB": database}) for k, v in spec["environment"].items()
        }
        url = sa.engine.make_url(env["HPO_STORAGE"])
        assert url.host == "postgres"
        env["HPO_STORAGE"] = url.set(host=local.host, port=local.port).render_as_string(
            hide_password=False
        )
        return [*spec["entrypoint"], *spec["command"], *extra], env

    storage = ""
    try:
        cmd, env = service("worker")
        storage = env["HPO_STORAGE"]
        log = open(tmp_path / "workers.log", "w")  # noqa: SIM115
        workers = [
            subprocess.Popen(
                cmd, cwd=ROOT, env=cli_env(**env), stdout=log, stderr=subprocess.STDOUT
            )
            for _ in range(4)
        ]
        cmd, env = service("coordinator")
        create = subprocess.run(
            cmd, cwd=ROOT, env=cli_env(**env), capture_output=True, text=True, timeout=120
        )
        assert create.returncode == 0, create.stderr
        name = create.stdout.splitlines()[-1]
        assert name == "linear-regression"
        wait_until(
            "the budget",
            lambda: counts(storage, name)["COMPLETE"] + counts(storage, name)["PRUNED"] >= 30,
            timeout=600,
            every=1,
        )
        for w in workers:
            w.send_signal(signal.SIGTERM)  # what `docker compose down` sends
        assert [w.wait(timeout=120) for w in workers] == [0, 0, 0, 0]
        cmd, env = service("inspect", name, "--format", "json")
        summary = json.loads(
            subprocess.run(
                cmd, cwd=ROOT, env=cli_env(**env), capture_output=True, text=True, timeout=120
            ).stdout
        )
        assert summary["counts"]["COMPLETE"] + summary["counts"]["PRUNED"] == 30
        assert summary["counts"]["RUNNING"] == summary["counts"]["WAITING"] == 0
        assert len(summary["workers"]) == 4
    finally:
        with pg_admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
