"""`make deploy`: create or update the maintenance work pool, its queue and every deployment.

Against the server at `PREFECT_API_URL`, in this order:
1. every deployment of prefect.yaml is made into the request the server's API takes
   (`deploy.deployments`: its flow loaded for the parameter schema, the schedules'
   timezone from `MAINTENANCE_TIMEZONE`, default UTC) and checked against the schema that
   server publishes; a field it does not know stops here, before anything is changed;
2. the work pool is created when missing, of the type `MAINTENANCE_WORK_POOL_TYPE` names
   (`process` by default, or `kubernetes`) with that type's base job template
   (`deploy.work_pools`); an existing pool is left as it is, unless it is of another type
   (then nothing is changed and the run fails);
3. the work queue is created with a concurrency limit of 1, or its limit is set back to 1;
4. each deployment is created or updated in place (same id; its schedules replaced by
   those of prefect.yaml, never added to);
5. every deployment of prefect.yaml is read back from the API on that pool and queue;
6. it prints the next step: `make worker`, after `make install PREFECT_VERSION=...` when
   the server runs another supported Prefect than this one (the worker runs the
   server's Prefect, so that the flows' task runs are recorded); for a kubernetes pool,
   the Secret and the `helm install` of the worker, with the server's Prefect.

A setting that is not valid (a pool type other than those two, a kubernetes pool without
`MAINTENANCE_IMAGE`) stops it before anything is changed.

Running it again leaves the pool, the queue and every deployment as they were (the
server swaps each schedule for an identical one and plans the next runs again). The
same code runs with any supported Prefect against any supported server.
"""

from __future__ import annotations

import asyncio
import os
import sys

import httpx
import prefect
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName
from prefect.exceptions import ObjectNotFound

from deploy import (
    PREFECT_VERSIONS_DIR,
    DeploymentConfigError,
    MaintenanceQueue,
    maintenance_queue,
    read_deployments,
    read_prefect_file,
    require_api_url,
)
from deploy.deployments import apply_deployment, check_accepted, deployment_requests
from deploy.work_pools import KUBERNETES, PREFECT_WORKER_CHART_VERSION, base_job_template
from tasks.prefect_api import PrefectApiError, call, prefect_client
from tasks.reports import plural
from tasks.settings import MaintenanceSettings, SettingsError, get_settings

QUEUE_CONCURRENCY_LIMIT = 1
# Read by prefect.yaml's `{{ $...}}` placeholders while deploying; the user's value wins.
# `make install PREFECT_VERSION=<version>` installs the Prefect of a server listed here.


async def ensure_work_pool(name: str, pool_type: str, template: dict) -> str:
    async with prefect_client() as client:
        try:
            pool = await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=pool_type,
                    description="Prefect maintenance flows: retention, stuck runs, health report.",
                    base_job_template=template,
                )
            )
            return f"work pool {name!r}: created (type {pool_type})"
    if pool.type != pool_type:
        raise DeploymentConfigError(
            f"work pool {name!r} exists with type {pool.type!r}; MAINTENANCE_WORK_POOL_TYPE asks "
            f"for a {pool_type!r} pool: rename one of them in prefect.yaml or on the server"
        )
    return f"work pool {name!r}: exists"


async def ensure_work_queue(target: MaintenanceQueue) -> str:
    async with prefect_client() as client:
        try:
            queue = await client.read_work_queue_by_name(target.queue, work_pool_name=target.pool)
        except ObjectNotFound:
            await client.create_work_queue(
                name=target.queue,
                work_pool_name=target.pool,
                concurrency_limit=QUEUE_CONCURRENCY_LIMIT,
                description="The single queue of the maintenance worker: one run at a time.",
            )
            return f"work queue {target.queue!r}: created, concurrency limit {QUEUE_CONCURRENCY_LIMIT}"
        if queue.concurrency_limit == QUEUE_CONCURRENCY_LIMIT:
            return f"work queue {target.queue!r}: exists, concurrency limit {QUEUE_CONCURRENCY_LIMIT}"
        await client.update_work_queue(queue.id, concurrency_limit=QUEUE_CONCURRENCY_LIMIT)
    return (
        f"work queue {target.queue!r}: concurrency limit changed from "
        f"{queue.concurrency_limit} to {QUEUE_CONCURRENCY_LIMIT}"
    )


async def verify_deployments(target: MaintenanceQueue, expected: list[str]) -> str:
    """Every deployment of prefect.yaml exists on the maintenance queue: reading them back
    is what tells a deploy that did not do what it said."""
    async with prefect_client() as client:
        deployments = await client.read_deployments(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[target.pool]))
        )
    on_queue = {deployment.name for deployment in deployments if deployment.work_queue_name == target.queue}
    missing = [name for name in expected if name not in on_queue]
    if missing:
        raise DeploymentConfigError(
            f"after deploying, these deployments are not on work queue {target.queue!r} of "
            f"pool {target.pool!r}: {', '.join(missing)}"
        )
    return f"read back: {plural(len(expected), 'deployment')} on {target.pool}/{target.queue}"


async def next_step(target: MaintenanceQueue, settings: MaintenanceSettings) -> str:
    """`make worker`, after installing the server's Prefect when this one is another; for a
    kubernetes pool, the Secret and the chart's worker, of the server's Prefect."""
    async with prefect_client() as client:
        server = await call(client, "GET", "/admin/version")
    supported = (PREFECT_VERSIONS_DIR / f"{server}.txt").exists()
    if settings.work_pool_type == KUBERNETES:
        namespace = settings.kubernetes_namespace
        # The image's Prefect is the lock's unless built for another: the build says which.
        image = (
            f"; the image runs the server's Prefect too: `docker build --build-arg "
            f"PREFECT_VERSION={server} -t {settings.image} -f docker/Dockerfile .`"
            if supported
            else ""
        )
        return (
            f"next: the Secret {settings.kubernetes_secret!r} in namespace {namespace!r} "
            "(deploy/kubernetes/secret.example.yaml), then the one worker of "
            f"{target.pool}/{target.queue}: `helm install prefect-maintenance-worker "
            f"prefect/prefect-worker --version {PREFECT_WORKER_CHART_VERSION} --namespace {namespace} "
            "-f deploy/kubernetes/worker-values.yaml "
            f"--set worker.image.prefectTag={server}-python3.11-kubernetes`{image}"
        )
    start_worker = f"`make worker` starts the one worker of {target.pool}/{target.queue}"
    if server == prefect.__version__ or not supported:
        return f"next: {start_worker}"
    return (
        f"next: `make install PREFECT_VERSION={server}` (the worker runs the Prefect of its "
        f"server, so that the flows' task runs are recorded; this one is {prefect.__version__}), "
        f"then {start_worker}"
    )


async def bootstrap() -> list[str]:
    api_url = require_api_url()
    # The environment as it is now: a bad setting stops the deploy here, before any change.
    settings = get_settings(refresh=True)
    document = read_prefect_file()
    target = maintenance_queue(read_deployments())
    # prefect.yaml's `{{ $MAINTENANCE_TIMEZONE }}` is filled from the environment.
    os.environ.setdefault("MAINTENANCE_TIMEZONE", settings.timezone)
    requests = deployment_requests(document)
    template = await base_job_template(settings)
    async with prefect_client() as client:
        await check_accepted(client, requests)
    report = [f"Prefect API: {api_url}"]
    report.append(await ensure_work_pool(target.pool, settings.work_pool_type, template))
    report.append(await ensure_work_queue(target))
    async with prefect_client() as client:
        for request in requests:
            report.append(await apply_deployment(client, request))
    report.append(await verify_deployments(target, [request.body["name"] for request in requests]))
    report.append(await next_step(target, settings))
    return report


def main() -> int:
    try:
        report = asyncio.run(bootstrap())
    except (DeploymentConfigError, SettingsError, PrefectApiError) as error:
        print(f"deploy failed: {error}", file=sys.stderr)
        return 1
    except httpx.HTTPError as error:
        print(
            f"deploy failed: the Prefect API did not answer: {type(error).__name__}: {error}", file=sys.stderr
        )
        return 1
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
