"""`make worker`: start the one worker of the maintenance work pool and queue.

It refuses to start when the pool is missing (run `make deploy` first), when it is not a
process pool (a kubernetes pool's worker is the chart's, in the cluster), or when a worker
with another name is online on the pool: several workers polling one queue is what
deadlocks PostgreSQL on the `last_polled` update each poll makes. A worker counts as
online until three missed heartbeats (about 90 s) after it stopped.

The worker is `prefect worker start` on that pool and queue, one run at a time
(`--limit 1`), replacing this process so that it receives the signals itself. It and its
runs use the Prefect installed here, which is to be the server's: `make install
PREFECT_VERSION=<the server's>` (`make deploy` says so when they differ). Its runs
move into `MAINTENANCE_PROJECT_DIR` (the deployments' pull step), which defaults to the
project folder this module belongs to (the checkout, or /app in the image). The worker is named `maintenance-<hostname>`, the same
across restarts on one host.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import sys

import httpx
import prefect
from prefect.cli.worker import start as prefect_worker_start
from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
from prefect.exceptions import ObjectNotFound

from deploy import (
    PREFECT_VERSIONS_DIR,
    PROJECT_ROOT,
    DeploymentConfigError,
    MaintenanceQueue,
    maintenance_queue,
    read_deployments,
    require_api_url,
)
from tasks.prefect_api import (
    EVENT_STREAM_ACCEPTS_AUTH,
    PrefectApiError,
    prefect_client,
    server_version,
    version_text,
    version_tuple,
)
from tasks.settings import SettingsError, get_settings

# One flow run at a time on this worker, whatever the queue says.
WORKER_RUN_LIMIT = 1
WORKER_TYPE = "process"


def worker_name() -> str:
    return f"maintenance-{socket.gethostname()}"


async def check_alone_on_pool(target: MaintenanceQueue, name: str) -> None:
    async with prefect_client() as client:
        try:
            pool = await client.read_work_pool(target.pool)
        except ObjectNotFound:
            raise DeploymentConfigError(
                f"work pool {target.pool!r} does not exist: run `make deploy` first"
            ) from None
        if pool.type != WORKER_TYPE:
            # A process worker on it would run the flows here, beside the pool's own worker.
            raise DeploymentConfigError(
                f"work pool {target.pool!r} is a {pool.type} pool: its one worker runs where its "
                f"runs go (for kubernetes, PrefectHQ's prefect-worker chart, README 'On Kubernetes'); "
                f"`make worker` is the worker of a {WORKER_TYPE} pool"
            )
        online = await client.read_workers_for_work_pool(
            target.pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
        )
    others = sorted(worker.name for worker in online if worker.name != name)
    if others:
        raise DeploymentConfigError(
            f"another worker is online on work pool {target.pool!r}: {', '.join(others)}. "
            "The maintenance queue has exactly one worker: stop that one first (it counts as "
            "online until about 90 s after its last heartbeat)"
        )


async def check_client_fits_server() -> None:
    """From 3.6.14 the client authenticates on the event stream, which older servers refuse:
    such a worker's runs crash (`EventsWorker failed`) or lose their task runs."""
    async with prefect_client() as client:
        server = await server_version(client)
    if server < EVENT_STREAM_ACCEPTS_AUTH <= version_tuple(prefect.__version__):
        server_text = version_text(server)
        supported = sorted(path.stem for path in PREFECT_VERSIONS_DIR.glob("*.txt"))
        raise DeploymentConfigError(
            f"this worker's Prefect {prefect.__version__} cannot open the event stream of the "
            f"Prefect {server_text} server, so its runs would crash: install the server's Prefect "
            f"first, `make install PREFECT_VERSION={server_text}` (supported: {', '.join(supported)}), "
            "or build the image with that PREFECT_VERSION"
        )


def worker_command(target: MaintenanceQueue, name: str) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "prefect",
        "worker",
        "start",
        "--pool",
        target.pool,
        "--work-queue",
        target.queue,
        "--type",
        WORKER_TYPE,
        "--limit",
        str(WORKER_RUN_LIMIT),
        "--name",
        name,
    ]
    # The pool is created by `make deploy`, with its queue; never a bare one here. Workers
    # of Prefect 3.4 and older have no such option (they create a missing pool): for them the
    # check that the pool exists, just before, is what stands in for it.
    if "create_pool_if_not_found" in inspect.signature(prefect_worker_start).parameters:
        command.append("--no-create-pool-if-not-found")
    return command


def main() -> int:
    name = worker_name()
    try:
        require_api_url()
        target = maintenance_queue(read_deployments())
        asyncio.run(check_client_fits_server())
        asyncio.run(check_alone_on_pool(target, name))
    except (DeploymentConfigError, SettingsError, PrefectApiError) as error:
        print(f"worker not started: {error}", file=sys.stderr)
        return 1
    except httpx.HTTPError as error:
        print(
            f"worker not started: the Prefect API did not answer: {type(error).__name__}: {error}",
            file=sys.stderr,
        )
        return 1
    # The deployments' pull step moves each run into `{{ $MAINTENANCE_PROJECT_DIR }}`.
    os.environ["MAINTENANCE_PROJECT_DIR"] = get_settings().project_dir or str(PROJECT_ROOT)
    command = worker_command(target, name)
    print(f"starting worker {name!r} on {target.pool}/{target.queue}", flush=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    raise SystemExit(main())
