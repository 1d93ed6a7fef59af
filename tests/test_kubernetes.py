"""A kubernetes work pool served by PrefectHQ's prefect-worker chart, checked without a cluster.

The story: a team on Kubernetes runs `make deploy` with `MAINTENANCE_WORK_POOL_TYPE=kubernetes`
and its image, applies the Secret with the database URLs, and installs the chart with
deploy/kubernetes/worker-values.yaml. Checked here: the chart's own schema accepts those
values (its values.schema.json, vendored beside them); the pool, its queue (limit 1) and the
four deployments are on the server; the Job that prefect-kubernetes' worker makes for each
maintenance run, from the pool's own template, is one Kubernetes accepts, and holds no
password; and so is the Job of a pool deployed without prefect-kubernetes (as from the image,
whose template is the server's copy of Prefect's).
"""

from __future__ import annotations

import copy
import json
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from conftest import serving
from jsonschema import Draft7Validator
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration
from test_deployments import POOL, QUEUE, SCHEDULED, UNSCHEDULED, deployment_snapshot, make

from deploy import PROJECT_ROOT, DeploymentConfigError, bootstrap, maintenance_queue, read_deployments
from deploy.work_pools import PREFECT_WORKER_CHART_VERSION
from localstack.prefect_versions import NEWEST, run_with_client
from tasks.prefect_api import prefect_client
from tasks.settings import MaintenanceSettings, SettingsError, get_settings, parse_database_url

KUBERNETES_DIR = PROJECT_ROOT / "deploy" / "kubernetes"
WORKER_VALUES = KUBERNETES_DIR / "worker-values.yaml"
CHART_SCHEMA = KUBERNETES_DIR / "prefect-worker.values.schema.json"
SECRET_EXAMPLE = KUBERNETES_DIR / "secret.example.yaml"
IMAGE = "registry.example.com/prefect-maintenance:0.1.0"
PASSWORD = "s3cr3t-Pa55word"
# What the deploying process and the worker hold: URLs with a password, which no pool,
# deployment or Job may carry (the Job gets them from the Secret, by name).
DATABASE_URLS = {
    "MAINTENANCE_DATABASE_URL": f"postgresql+asyncpg://maintenance_purge:{PASSWORD}@db.internal:5432/prefect",
    "MAINTENANCE_REPORT_DATABASE_URL": f"postgresql+asyncpg://maintenance_report:{PASSWORD}@db.internal:5432/prefect",
}
KUBERNETES_DEPLOY = {"MAINTENANCE_WORK_POOL_TYPE": "kubernetes", "MAINTENANCE_IMAGE": IMAGE, **DATABASE_URLS}
SECRET_NAME = MaintenanceSettings.model_fields["kubernetes_secret"].default
# An older Kubernetes, and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
WORKER_NAME = yaml.safe_load(WORKER_VALUES.read_text())["worker"]["config"]["name"]
# prefect-kubernetes' worker refuses a template without these in the pod spec, where they do
# not belong (they are Job fields): the API server drops them with a warning. Strict
# validation sees the rest of the Job.
POD_SPEC_FIELDS_DROPPED = ("parallelism", "completions")


def chart_validator() -> Draft7Validator:
    # The chart's schema names no draft ("http://json-schema.org/schema#"); its keywords are Draft 7's.
    schema = json.loads(CHART_SCHEMA.read_text())
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


@pytest.fixture
def environment(monkeypatch):
    """This process's environment, changed for one test; the settings read again after."""
    yield monkeypatch
    monkeypatch.undo()
    get_settings(refresh=True)


@pytest.mark.no_stack
def test_the_chart_accepts_the_worker_values_one_worker_of_the_maintenance_queue():
    values = yaml.safe_load(WORKER_VALUES.read_text())
    assert not sorted(chart_validator().iter_errors(values), key=str)
    worker = values["worker"]
    target = maintenance_queue(read_deployments())
    assert (worker["config"]["workPool"], worker["config"]["workQueues"]) == (target.pool, [target.queue])
    assert worker["replicaCount"] == 1
    assert worker["autoscaling"]["enabled"] is False
    assert worker["config"]["limit"] == 1
    assert worker["config"]["type"] == "kubernetes"
    # The pool's template is `make deploy`'s: the chart would overwrite it at every start.
    assert "baseJobTemplate" not in worker["config"]
    assert f"chart version {PREFECT_WORKER_CHART_VERSION}" in WORKER_VALUES.read_text()


@pytest.mark.no_stack
@pytest.mark.parametrize(
    ("path", "value", "refused"),
    [
        (("worker", "replicaCount"), "one", "'one' is not of type 'integer'"),
        (("worker", "config", "workPools"), ["maintenance"], "'workPools' was unexpected"),
        (("worker", "apiConfig"), "selfHosted", "'selfHosted' is not one of"),
    ],
)
def test_the_chart_schema_refuses_a_broken_values_file(path, value, refused):
    values = yaml.safe_load(WORKER_VALUES.read_text())
    broken = copy.deepcopy(values)
    *parents, key = path
    target = broken
    for parent in parents:
        target = target[parent]
    target[key] = value
    messages = [error.message for error in chart_validator().iter_errors(broken)]
    assert any(refused in message for message in messages), messages


@pytest.mark.no_stack
def test_the_secret_example_is_a_kubernetes_secret_of_placeholders():
    secret = yaml.safe_load(SECRET_EXAMPLE.read_text())
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(secret, version, strict=True)
    assert secret["metadata"]["name"] == SECRET_NAME
    assert set(secret["stringData"]) == set(DATABASE_URLS)
    for url in secret["stringData"].values():
        assert parse_database_url(url) == ("postgresql", "asyncpg")
        assert urlsplit(url).password == "<password>"


async def test_a_bad_pool_setting_stops_the_deploy_before_anything_changes(fresh_server):
    server = fresh_server()
    for settings, named in (
        (
            {"MAINTENANCE_WORK_POOL_TYPE": "docker"},
            "MAINTENANCE_WORK_POOL_TYPE: Input should be 'process' or 'kubernetes'",
        ),
        (
            {"MAINTENANCE_WORK_POOL_TYPE": "kubernetes", "MAINTENANCE_IMAGE": ""},
            "MAINTENANCE_IMAGE is not set",
        ),
    ):
        with serving(server):
            with pytest.MonkeyPatch.context() as patch:
                for name, value in settings.items():
                    patch.setenv(name, value)
                with pytest.raises((SettingsError, DeploymentConfigError), match=named):
                    await bootstrap.bootstrap()
            async with prefect_client() as client:
                assert not await client.read_work_pools()
                assert not await client.read_deployments()
                assert not await client.read_flows()


@pytest.fixture(scope="module")
def kubernetes_deploy(module_server):
    result = make("deploy", module_server, **KUBERNETES_DEPLOY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


async def test_make_deploy_creates_a_kubernetes_pool_with_one_queue_and_the_four_deployments(
    on_module_server, kubernetes_deploy
):
    snapshot = await deployment_snapshot()
    assert snapshot["pools"] == [(POOL, "kubernetes", None)]
    assert [(name, limit) for name, limit, _ in snapshot["queues"]] == [("default", None), (QUEUE, 1)]
    assert set(snapshot["deployments"]) == set(SCHEDULED) | UNSCHEDULED
    for name, deployment in snapshot["deployments"].items():
        assert (deployment["work_pool_name"], deployment["work_queue_name"]) == (POOL, QUEUE), name
    assert f"work pool '{POOL}': created (type kubernetes)" in kubernetes_deploy.stdout
    # The next step is the Secret and the chart's worker, never `make worker`.
    next_step = kubernetes_deploy.stdout.splitlines()[-1]
    assert next_step.startswith(f"next: the Secret '{SECRET_NAME}' in namespace 'prefect'")
    assert (
        f"helm install prefect-maintenance-worker prefect/prefect-worker --version {PREFECT_WORKER_CHART_VERSION}"
        in next_step
    )
    assert f"--set worker.image.prefectTag={NEWEST}-python3.11-kubernetes" in next_step
    assert f"docker build --build-arg PREFECT_VERSION={NEWEST} -t {IMAGE}" in next_step
    assert "make worker" not in next_step


def test_make_worker_refuses_a_kubernetes_pool(module_server, kubernetes_deploy):
    # A process worker here would run the maintenance flows beside the chart's worker.
    result = make("worker", module_server)
    assert result.returncode != 0
    assert (
        f"worker not started: work pool '{POOL}' is a kubernetes pool: its one worker runs where its runs go"
        in result.stderr
    ), result.stderr[-2000:]


async def rendered_jobs(deployment_names: set[str]) -> dict[str, dict]:
    """The Job manifest prefect-kubernetes' worker would create for a new run of each
    deployment, from the pool's template and the deployment's job variables."""
    jobs = {}
    async with prefect_client() as client:
        pool = await client.read_work_pool(POOL)
        for name in sorted(deployment_names):
            deployment = await client.read_deployment_by_name(name)
            flow_run = await client.create_flow_run_from_deployment(deployment.id)
            configuration = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
                flow_run, client=client, work_pool=pool, worker_name=WORKER_NAME, deployment=deployment
            )
            jobs[name] = {"namespace": configuration.namespace, "manifest": configuration.job_manifest}
    return jobs


def check_maintenance_job(job: dict) -> None:
    """Kubernetes accepts the Job; it runs the project's image with the Secret's environment,
    small requests and a time to live, and carries no password."""
    manifest = job["manifest"]
    stored = copy.deepcopy(manifest)
    for field in POD_SPEC_FIELDS_DROPPED:
        assert stored["spec"]["template"]["spec"].pop(field) == 1
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(manifest, version)
        kubernetes_validate.validate(stored, version, strict=True)
    assert job["namespace"] == manifest["metadata"]["namespace"] == "prefect"
    assert manifest["spec"]["ttlSecondsAfterFinished"] == 24 * 60 * 60
    [container] = manifest["spec"]["template"]["spec"]["containers"]
    assert container["image"] == IMAGE
    assert container["envFrom"] == [{"secretRef": {"name": SECRET_NAME}}]
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    }
    assert container["args"] == ["prefect", "flow-run", "execute"]
    environment = {variable["name"]: variable.get("value") for variable in container["env"]}
    assert "PREFECT__FLOW_RUN_ID" in environment
    assert not set(DATABASE_URLS) & set(environment)
    assert PASSWORD not in json.dumps(manifest)


async def test_the_job_of_every_maintenance_run_is_valid_kubernetes_without_a_password(
    on_module_server, kubernetes_deploy, environment
):
    # The worker's own environment holds the URLs too: none of it reaches the Job.
    for name, url in DATABASE_URLS.items():
        environment.setenv(name, url)
    jobs = await rendered_jobs(set(SCHEDULED) | UNSCHEDULED)
    for name, job in jobs.items():
        try:
            check_maintenance_job(job)
        except (AssertionError, kubernetes_validate.ValidationError) as error:
            raise AssertionError(f"{name}: {error}") from error
    async with prefect_client() as client:
        pool = await client.read_work_pool(POOL)
    stored = json.dumps([pool.base_job_template, (await deployment_snapshot())["deployments"]], default=str)
    assert PASSWORD not in stored and "maintenance_purge:" not in stored


async def test_a_pool_deployed_without_prefect_kubernetes_makes_the_same_job(fresh_server, tmp_path):
    # The image's `make deploy` (and an older Prefect's) has no prefect-kubernetes: the
    # template is the server's copy of Prefect's default for the type.
    server = fresh_server()
    result = run_with_client(
        NEWEST,
        ["-m", "deploy.bootstrap"],
        api_url=server.api_url,
        home=tmp_path / "client-home",
        environment=KUBERNETES_DEPLOY,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"work pool '{POOL}': created (type kubernetes)" in result.stdout
    with serving(server):
        jobs = await rendered_jobs({"retention/nightly"})
    check_maintenance_job(jobs["retention/nightly"])


async def test_deploying_a_process_pool_over_the_kubernetes_pool_changes_nothing(
    on_module_server, kubernetes_deploy, environment
):
    before = await deployment_snapshot()
    environment.delenv("MAINTENANCE_WORK_POOL_TYPE", raising=False)
    with pytest.raises(
        DeploymentConfigError,
        match=f"work pool '{POOL}' exists with type 'kubernetes'; MAINTENANCE_WORK_POOL_TYPE asks for a 'process' pool",
    ):
        await bootstrap.bootstrap()
    assert await deployment_snapshot() == before
