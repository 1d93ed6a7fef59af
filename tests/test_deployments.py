"""`make deploy` and `make worker` against a real Prefect server on PostgreSQL.

The story: an operator runs `make deploy` next to their server (twice, because that is
what people do), applies the roles' SQL, starts `make worker` with the least-privilege
URLs, and after an incident asks for an ad-hoc cleanup from the CLI; the run goes through
the single worker, deletes what is old, and leaves its report in the UI.

An operator of an older server deploys the same deployments with this checkout's Prefect
or with the server's own, and runs the worker with the server's own Prefect, whose runs
record their task runs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import serving
from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from sqlalchemy.engine import make_url
from workers import start_worker, stop_worker, wait_until_final

from deploy import PROJECT_ROOT, DeploymentConfigError, MaintenanceQueue, bootstrap, read_prefect_file
from deploy.worker import check_alone_on_pool, worker_name
from localstack.prefect_versions import run_with_client
from localstack.seed import seed_messy_history
from tasks.database import connect
from tasks.prefect_api import call, prefect_client

ROLES_SQL = PROJECT_ROOT / "docker" / "roles.sql"
POOL = QUEUE = "maintenance"
SCHEDULED = {
    "retention/nightly": "0 3 * * *",
    "reconcile-stuck-runs/every-10-minutes": "*/10 * * * *",
    "db-health-report/daily": "0 6 * * *",
}
UNSCHEDULED = {"retention/ad-hoc"}
# The oldest supported server, deployed to by both clients (the support matrix deploys to
# every version with its own client and sends a run through its worker).
OLDER_VERSIONS = ("3.1.15",)
# What `prefect deploy` printed, which `make deploy` must not: a hint to start a worker per
# deployment, and warnings about the placeholder the worker resolves.
PREFECT_DEPLOY_NOISE = ("prefect worker start", "MAINTENANCE_PROJECT_DIR")


def make(target: str, server, **environment: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", target],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PREFECT_API_URL": server.api_url, **environment},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def first_deploy(module_server) -> subprocess.CompletedProcess:
    result = make("deploy", module_server)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def role_url(server, role: str) -> str:
    # The embedded server trusts local connections: the roles' privileges are under test here.
    return make_url(server.database_url).set(username=role).render_as_string(hide_password=False)


def apply_roles(stack, server) -> dict[str, str]:
    """docker/roles.sql on the server's database; the URL of each maintenance role."""
    database = make_url(server.database_url).database
    passwords = {"MAINTENANCE_PURGE_PASSWORD": "purge-secret", "MAINTENANCE_REPORT_PASSWORD": "report-secret"}
    for _ in range(2):  # idempotent: applied again after a Prefect upgrade
        stack.postgres.psql_file(ROLES_SQL, database, environment=passwords)
    return {role: role_url(server, role) for role in ("maintenance_purge", "maintenance_report")}


@pytest.fixture(scope="module")
def roles(stack, module_server) -> dict[str, str]:
    return apply_roles(stack, module_server)


@pytest.fixture(scope="module", params=OLDER_VERSIONS)
def older_server(request, module_server_factory):
    return module_server_factory(version=request.param)


@pytest.fixture(scope="module")
def older_deploy(older_server) -> subprocess.CompletedProcess:
    """`make deploy` with this checkout's Prefect against the older server."""
    result = make("deploy", older_server)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def deploy_with_own_client(server, home: Path) -> subprocess.CompletedProcess:
    """`python -m deploy.bootstrap` (what `make deploy` runs) with the server's own Prefect."""
    result = run_with_client(server.version(), ["-m", "deploy.bootstrap"], api_url=server.api_url, home=home)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


async def deployment_snapshot() -> dict:
    """What `make deploy` controls, as the API shows it (with the ids, which stay)."""
    async with prefect_client() as client:
        pools = await client.read_work_pools()
        queues = await call(client, "POST", f"/work_pools/{POOL}/queues/filter", json={})
        deployments = await client.read_deployments(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[POOL]))
        )
        flow_names = {
            deployment.flow_id: (await client.read_flow(deployment.flow_id)).name
            for deployment in deployments
        }
    return {
        "pools": sorted((pool.name, pool.type, pool.concurrency_limit) for pool in pools),
        "queues": sorted((queue["name"], queue["concurrency_limit"], queue["id"]) for queue in queues),
        "deployments": {
            f"{flow_names[deployment.flow_id]}/{deployment.name}": {
                "id": deployment.id,
                "entrypoint": deployment.entrypoint,
                "work_pool_name": deployment.work_pool_name,
                "work_queue_name": deployment.work_queue_name,
                "schedules": sorted(
                    (schedule.schedule.cron, schedule.schedule.timezone, schedule.active)
                    for schedule in deployment.schedules
                ),
                "parameters": deployment.parameters,
                "parameter_schema": deployment.parameter_openapi_schema,
                "enforce_parameter_schema": deployment.enforce_parameter_schema,
                "tags": deployment.tags,
                "description": deployment.description,
                "concurrency_limit": deployment.global_concurrency_limit.limit,
                "collision_strategy": deployment.concurrency_options.collision_strategy.value,
                "pull_steps": deployment.pull_steps,
            }
            for deployment in deployments
        },
    }


async def test_deploy_creates_the_four_deployments_on_one_queue(on_module_server, first_deploy):
    snapshot = await deployment_snapshot()
    assert snapshot["pools"] == [(POOL, "process", None)]
    assert [(name, limit) for name, limit, _ in snapshot["queues"]] == [("default", None), (QUEUE, 1)]
    deployments = snapshot["deployments"]
    assert set(deployments) == set(SCHEDULED) | UNSCHEDULED
    for name, deployment in deployments.items():
        assert (deployment["work_pool_name"], deployment["work_queue_name"]) == (POOL, QUEUE), name
        assert (deployment["concurrency_limit"], deployment["collision_strategy"]) == (1, "CANCEL_NEW"), name
        assert deployment["enforce_parameter_schema"] is True, name
        assert deployment["tags"] == ["maintenance"], name
        assert deployment["description"], name
        expected = [(SCHEDULED[name], "UTC", True)] if name in SCHEDULED else []
        assert deployment["schedules"] == expected, name
        # The code is found where the worker runs, resolved when each run starts.
        first_step = deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
        assert first_step == {"directory": "{{ $MAINTENANCE_PROJECT_DIR }}"}, name
    assert deployments["retention/nightly"]["parameters"] == {"dry_run": False, "engine": "auto"}
    assert deployments["retention/ad-hoc"]["parameters"] == {"dry_run": True}
    read_only = {name for name, deployment in deployments.items() if len(deployment["pull_steps"]) == 2}
    assert read_only == {"reconcile-stuck-runs/every-10-minutes", "db-health-report/daily"}


def without_ids(snapshot: dict) -> dict:
    """The snapshot of one server in terms another server's can equal."""
    return {
        "pools": snapshot["pools"],
        "queues": [(name, limit) for name, limit, _ in snapshot["queues"]],
        "deployments": {
            name: {field: value for field, value in deployment.items() if field != "id"}
            for name, deployment in snapshot["deployments"].items()
        },
    }


async def test_the_custom_run_form_is_typed_and_enforced(on_module_server, first_deploy):
    deployments = (await deployment_snapshot())["deployments"]
    form = deployments["retention/ad-hoc"]["parameter_schema"]["properties"]
    assert form["dry_run"]["type"] == "boolean"
    assert form["older_than_days"]["type"] == "number"
    assert set(form["engine"]["enum"]) == {"auto", "api", "sql"}
    for name in ("deployment_names", "flow_names", "tags", "exclude_tags"):
        assert name in form
    async with prefect_client() as client:
        with pytest.raises(PrefectHTTPStatusError, match="older_than_days"):
            await client.create_flow_run_from_deployment(
                deployments["retention/ad-hoc"]["id"], parameters={"older_than_days": "last week"}
            )


async def test_deploying_again_changes_nothing(on_module_server, first_deploy):
    before = await deployment_snapshot()
    again = make("deploy", on_module_server)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"work pool '{POOL}': exists" in again.stdout
    assert f"work queue '{QUEUE}': exists, concurrency limit 1" in again.stdout
    assert "deployment 'retention/nightly': updated" in again.stdout
    assert again.stdout.splitlines()[-1] == f"next: `make worker` starts the one worker of {POOL}/{QUEUE}"
    assert not [noise for noise in PREFECT_DEPLOY_NOISE if noise in again.stdout + again.stderr]
    assert await deployment_snapshot() == before


async def test_both_clients_deploy_the_same_deployments_on_an_older_server(
    module_server, first_deploy, older_server, older_deploy, tmp_path
):
    version = older_server.version()
    assert not [noise for noise in PREFECT_DEPLOY_NOISE if noise in older_deploy.stdout + older_deploy.stderr]
    # This checkout's Prefect says which one the worker needs.
    assert older_deploy.stdout.splitlines()[-1].startswith(f"next: `make install PREFECT_VERSION={version}`")
    with serving(older_server):
        deployed = await deployment_snapshot()
    own = deploy_with_own_client(older_server, tmp_path / "client-home")
    assert "deployment 'retention/nightly': updated" in own.stdout
    assert own.stdout.splitlines()[-1] == f"next: `make worker` starts the one worker of {POOL}/{QUEUE}"
    with serving(older_server):
        assert await deployment_snapshot() == deployed
    with serving(module_server):
        assert without_ids(deployed) == without_ids(await deployment_snapshot())


async def test_a_field_the_server_does_not_know_stops_the_deploy_before_any_change(
    older_server, older_deploy, monkeypatch
):
    # A grace period for the concurrency slot: Prefect 3.9 knows it, older servers do not.
    document = read_prefect_file()
    for deployment in document["deployments"]:
        deployment["concurrency_limit"] = {**deployment["concurrency_limit"], "grace_period_seconds": 60}
        deployment["schedules"] = [
            {**schedule, "timezone": "Europe/Paris"} for schedule in deployment.get("schedules", [])
        ]
    monkeypatch.setattr(bootstrap, "read_prefect_file", lambda: document)
    with serving(older_server):
        before = await deployment_snapshot()
        with pytest.raises(
            DeploymentConfigError,
            match=r"nothing was changed.*retention/nightly: concurrency_options: .*'grace_period_seconds' was unexpected",
        ):
            await bootstrap.bootstrap()
        assert await deployment_snapshot() == before


async def test_deploy_sets_a_changed_queue_limit_back_to_one(on_module_server, first_deploy):
    async with prefect_client() as client:
        queue = await client.read_work_queue_by_name(QUEUE, work_pool_name=POOL)
        await client.update_work_queue(queue.id, concurrency_limit=4)
    target = MaintenanceQueue(pool=POOL, queue=QUEUE)
    assert (
        await bootstrap.ensure_work_queue(target)
        == f"work queue '{QUEUE}': concurrency limit changed from 4 to 1"
    )
    async with prefect_client() as client:
        assert (await client.read_work_queue_by_name(QUEUE, work_pool_name=POOL)).concurrency_limit == 1


async def test_roles_report_reads_purge_deletes_neither_reads_secrets(on_module_server, roles):
    purge, report = roles["maintenance_purge"], roles["maintenance_report"]
    async with connect(report) as connection:
        assert (await connection.execute(sa.text("SELECT count(*) FROM flow_run"))).scalar() >= 0
        assert (await connection.execute(sa.text("SELECT table_len FROM pgstattuple('log')"))).scalar() >= 0
        for statement in ("DELETE FROM log", "UPDATE flow_run SET name = name"):
            with pytest.raises(sa.exc.DBAPIError, match="read-only transaction"):
                await connection.execute(sa.text(statement))
            await connection.rollback()
    async with connect(report) as connection:
        await connection.execute(sa.text("SET TRANSACTION READ WRITE"))
        with pytest.raises(sa.exc.DBAPIError, match="permission denied for table log"):
            await connection.execute(sa.text("DELETE FROM log"))
    async with connect(purge) as connection:
        await connection.execute(sa.text("SELECT id FROM flow_run FOR UPDATE SKIP LOCKED"))
        await connection.execute(sa.text("DELETE FROM log WHERE flow_run_id IS NULL AND false"))
        await connection.rollback()
        with pytest.raises(sa.exc.DBAPIError, match="permission denied for table flow_run"):
            await connection.execute(sa.text("UPDATE flow_run SET state_type = 'COMPLETED'"))
        await connection.rollback()
    for url in (purge, report):
        for secret_table in ("configuration", "block_document", "variable"):
            async with connect(url) as connection:
                with pytest.raises(sa.exc.DBAPIError, match=f"permission denied for table {secret_table}"):
                    await connection.execute(sa.text(f"SELECT * FROM {secret_table}"))


def cli_run(server, deployment: str, *parameters: str) -> str:
    """`prefect deployment run` as the README shows it; returns the new run's id."""
    result = subprocess.run(
        [str(PROJECT_ROOT / ".venv" / "bin" / "prefect"), "deployment", "run", deployment, *parameters],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PREFECT_API_URL": server.api_url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return next(line.split("UUID:")[1].strip() for line in result.stdout.splitlines() if "UUID:" in line)


async def test_ad_hoc_cleanup_goes_through_the_single_worker(on_module_server, first_deploy, roles, tmp_path):
    history = await seed_messy_history(
        on_module_server.database_url, prefix="incident", old_runs_per_deployment=1, poison_pill=False
    )
    worker = start_worker(on_module_server, roles, tmp_path / "worker.log")
    try:
        cleanup = cli_run(
            on_module_server,
            "retention/ad-hoc",
            "-p",
            "dry_run=false",
            "-p",
            "older_than_days=30",
            "-p",
            "engine=sql",
        )
        health = cli_run(on_module_server, "db-health-report/daily")
        reconcile = cli_run(on_module_server, "reconcile-stuck-runs/every-10-minutes", "-p", "dry_run=true")
        runs = await wait_until_final([cleanup, health, reconcile])
    finally:
        stop_worker(worker)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert {str(run.id): run.state_name for run in runs.values()} == {
        cleanup: "Completed",
        health: "Completed",
        reconcile: "Completed",
    }, log[-5000:]
    # One worker and a queue limit of 1: the runs went one after another, never together.
    spans = sorted((run.start_time, run.end_time) for run in runs.values())
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:], strict=False)), spans
    assert {run.work_queue_name for run in runs.values()} == {QUEUE}

    async with prefect_client() as client:
        for run_id, key in (
            (cleanup, "retention-report"),
            (health, "db-health-report"),
            (reconcile, "reconcile-report"),
        ):
            artifacts = await call(
                client, "POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}
            )
            assert key in {artifact["key"] for artifact in artifacts}, (key, log[-5000:])
        # The cleanup ran retention's SQL engine as maintenance_purge: the old runs are gone.
        for run_id in history.old_finished:
            with pytest.raises(ObjectNotFound):
                await client.read_flow_run(run_id)
        for run_id in history.recent_finished:
            assert (await client.read_flow_run(run_id)).state.is_final()


async def test_a_worker_with_a_newer_prefect_than_an_older_server_refuses_to_start(
    older_server, older_deploy
):
    # From 3.6.14 the client authenticates on the event stream, which older servers refuse.
    result = make("worker", older_server)
    version = older_server.version()
    assert result.returncode != 0
    assert f"cannot open the event stream of the Prefect {version} server" in result.stderr
    assert f"make install PREFECT_VERSION={version}" in result.stderr


async def test_the_worker_refuses_to_start_next_to_another_one(on_module_server, first_deploy):
    async with prefect_client() as client:
        await client.send_worker_heartbeat(POOL, "someone-elses-worker", heartbeat_interval_seconds=30)
    try:
        result = make("worker", on_module_server)
    finally:
        async with prefect_client() as client:
            await call(client, "DELETE", f"/work_pools/{POOL}/workers/someone-elses-worker")
    assert result.returncode != 0
    assert "another worker is online on work pool 'maintenance': someone-elses-worker" in result.stderr


async def test_the_worker_needs_the_pool_from_make_deploy(on_module_server):
    with pytest.raises(
        DeploymentConfigError, match="work pool 'elsewhere' does not exist: run `make deploy` first"
    ):
        await check_alone_on_pool(MaintenanceQueue(pool="elsewhere", queue=QUEUE), worker_name())
    async with prefect_client() as client:
        with pytest.raises(ObjectNotFound):
            await client.read_work_pool("elsewhere")


@pytest.mark.no_stack
def test_deploy_refuses_without_an_api_url(capsys):
    # Without PREFECT_API_URL, Prefect would deploy to a throwaway server of its own.
    assert bootstrap.main() == 1
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err
