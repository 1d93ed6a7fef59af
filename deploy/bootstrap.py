"""`make deploy`: create or update the maintenance work pool, its queue and every deployment.

Against the server at `PREFECT_API_URL`, in this order:
1. the work pool (type `process`) is created when missing; an existing pool is left as
   it is, unless it is of another type (then nothing is changed and the run fails);
2. the work queue is created with a concurrency limit of 1, or its limit is set back to 1;
3. `prefect --no-prompt deploy --all` creates or updates every deployment of
   prefect.yaml (an update replaces a deployment's schedules, it never adds to them);
4. every deployment of prefect.yaml is read back from the API on that pool and queue.

Running it again leaves the pool, the queue and every deployment as they were (Prefect
swaps each schedule for an identical one and lets its scheduler plan the next runs
again). `MAINTENANCE_TIMEZONE` (default UTC) sets the timezone of the schedules.
Prefect warns while deploying that `{{ $MAINTENANCE_PROJECT_DIR }}` has no value: that
placeholder is resolved when each run starts, on the worker.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName
from prefect.exceptions import ObjectNotFound
from prefect.workers.process import ProcessWorker

from deploy import (
    PREFECT_FILE,
    PROJECT_ROOT,
    DeploymentConfigError,
    MaintenanceQueue,
    maintenance_queue,
    read_deployments,
    require_api_url,
)
from tasks.prefect_api import prefect_client

WORK_POOL_TYPE = ProcessWorker.type
QUEUE_CONCURRENCY_LIMIT = 1
# Read by prefect.yaml's `{{ $...}}` placeholders while deploying; the user's value wins.
DEPLOY_ENVIRONMENT_DEFAULTS = {"MAINTENANCE_TIMEZONE": "UTC"}


async def ensure_work_pool(name: str) -> str:
    async with prefect_client() as client:
        try:
            pool = await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=WORK_POOL_TYPE,
                    description="Prefect maintenance flows: retention, stuck runs, health report.",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
            return f"work pool {name!r}: created (type {WORK_POOL_TYPE})"
    if pool.type != WORK_POOL_TYPE:
        raise DeploymentConfigError(
            f"work pool {name!r} exists with type {pool.type!r}; the maintenance flows need a "
            f"{WORK_POOL_TYPE!r} pool: rename one of them in prefect.yaml or on the server"
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


def deploy_all() -> None:
    """`prefect --no-prompt deploy --all` from the project folder, where the entrypoints are."""
    environment = {**DEPLOY_ENVIRONMENT_DEFAULTS, **os.environ}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect",
            "--no-prompt",
            "deploy",
            "--all",
            "--prefect-file",
            str(PREFECT_FILE),
        ],
        cwd=PROJECT_ROOT,
        env=environment,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if result.returncode != 0:
        raise DeploymentConfigError(f"prefect deploy failed with exit code {result.returncode}")


async def verify_deployments(target: MaintenanceQueue, expected: list[str]) -> list[str]:
    """Every deployment of prefect.yaml exists on the maintenance queue.

    `prefect deploy` skips a prefect.yaml it cannot validate with a warning and exit code
    0; reading the deployments back is what tells a deploy that did nothing.
    """
    async with prefect_client() as client:
        deployments = await client.read_deployments(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[target.pool]))
        )
    on_queue = {
        deployment.name: deployment
        for deployment in deployments
        if deployment.work_queue_name == target.queue
    }
    missing = [name for name in expected if name not in on_queue]
    if missing:
        raise DeploymentConfigError(
            f"after prefect deploy, these deployments are not on work queue {target.queue!r} of "
            f"pool {target.pool!r}: {', '.join(missing)}"
        )
    return [f"deployment {name!r}: on {target.pool}/{target.queue}" for name in expected]


async def bootstrap() -> list[str]:
    api_url = require_api_url()
    deployments = read_deployments()
    target = maintenance_queue(deployments)
    report = [f"Prefect API: {api_url}"]
    report.append(await ensure_work_pool(target.pool))
    report.append(await ensure_work_queue(target))
    deploy_all()
    report += await verify_deployments(target, [deployment["name"] for deployment in deployments])
    return report


def main() -> int:
    try:
        report = asyncio.run(bootstrap())
    except DeploymentConfigError as error:
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
