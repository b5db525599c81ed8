"""Dockerfile, docker-compose.yml, the Swarm stack and the Kubernetes manifests keep their
contract. The compose path itself runs for real, in a Docker engine:
tests/containers/test_containers.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.conftest import BIN, ROOT, missing_service

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


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
    storage = worker["environment"]["HPO_STORAGE"]
    assert "@${POSTGRES_HOST:-postgres}:${POSTGRES_PORT:-5432}/" in storage
    assert worker["init"] is True  # signals reach a worker that is still importing
    assert "./experiments:/app/experiments:ro" in worker["volumes"]


def test_postgres_service() -> None:
    pg = SERVICES["postgres"]
    assert re.fullmatch(r"postgres:\d+", pg["image"])
    assert "ports" not in pg  # workers reach it on the compose network; nothing on the host
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert pg["volumes"] == ["pgdata:/var/lib/postgresql/data"] and "pgdata" in COMPOSE["volumes"]
    assert pg["environment"]["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:-hpo-dev-only}"


def test_every_published_port_is_on_loopback_only() -> None:
    published = [(name, p) for name, s in SERVICES.items() for p in s.get("ports", [])]
    assert {name for name, _ in published} == {"dashboard"}
    assert all(p.startswith("127.0.0.1:") for _, p in published)
    db_port = yaml.safe_load((ROOT / "docker-compose.db-port.yml").read_text())["services"]
    (published_db,) = db_port["postgres"]["ports"]
    assert published_db == "${POSTGRES_BIND:-127.0.0.1}:${POSTGRES_HOST_PORT:-15432}:5432"


def test_tools_run_under_profiles() -> None:
    assert SERVICES["coordinator"]["profiles"] == ["tools"]
    assert SERVICES["coordinator"]["command"] == ["create", "config.yaml"]
    assert SERVICES["inspect"]["profiles"] == ["tools"]
    # Off by default but not behind a profile, so a plain `docker compose down` removes it too.
    assert SERVICES["dashboard"]["scale"] == 0 and "profiles" not in SERVICES["dashboard"]
    assert SERVICES["dashboard"]["entrypoint"] == ["hpo-coordinator", "dashboard"]


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
    assert not text.startswith("# syntax=")  # no BuildKit frontend fetched from a registry
    assert re.match(r"FROM python:3\.\d+-slim$", lines[0])
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines
    first_source_copy = next(
        i for i, line in enumerate(lines) if line.startswith("COPY hpo_framework")
    )
    deps = next(i for i, line in enumerate(lines) if "pip install -r /tmp/requirements" in line)
    assert deps < first_source_copy  # dependencies cached in a layer before the source
    assert any(line.startswith("USER ") and line != "USER root" for line in lines)
    assert lines[-1] == 'ENTRYPOINT ["hpo-worker"]'
    assert lines[-2].startswith("HEALTHCHECK ") and lines[-2].endswith(
        'CMD ["hpo-worker", "--check"]'
    )
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
    container = pod["containers"][0]
    assert container["livenessProbe"]["exec"]["command"] == ["hpo-worker", "--check"]
    assert container["readinessProbe"]["exec"]["command"] == ["hpo-worker", "--check", "--ready"]
    assert "--resume" in job["command"]  # the Job may run again: create is idempotent then


def test_kubernetes_manifests_are_valid_against_the_kubernetes_schemas() -> None:
    """Offline, strict (unknown fields refused), with the schemas kubernetes-validate ships."""
    manifests = sorted(
        str(p) for p in (ROOT / "deploy" / "k8s").glob("*.yaml") if p.name != "kustomization.yaml"
    )
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", *manifests],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == 5, result.stdout


def test_swarm_stack_renders_with_docker_stack_config() -> None:
    if shutil.which("docker") is None:  # the CLI alone renders stacks; no engine is needed
        missing_service(
            "the docker CLI is not installed; it validates deploy/swarm/docker-stack.yml"
        )
    env = {**os.environ, "HPO_IMAGE": "registry.example.com/hpo:1", "POSTGRES_PASSWORD": "x"}
    result = subprocess.run(
        ["docker", "stack", "config", "-c", "deploy/swarm/docker-stack.yml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]
    assert rendered["worker"]["deploy"]["replicas"] == 4
    assert rendered["worker"]["stop_grace_period"] == "10m0s"
