"""A maintenance worker in a process of its own, as `make worker` starts it, for the tests
that send runs through it."""

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from deploy import PROJECT_ROOT
from tasks.prefect_api import prefect_client

# Long enough for a cold flow-run process on a busy 2-core machine; a run is normally done in 10-20 s.
RUN_TIMEOUT_SECONDS = 240


def start_worker(
    server, roles, log_path: Path, command: tuple[str, ...] = ("make", "--no-print-directory", "worker")
) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            list(command),
            cwd=PROJECT_ROOT,
            env={
                **os.environ,
                "PREFECT_API_URL": server.api_url,
                "MAINTENANCE_DATABASE_URL": roles["maintenance_purge"],
                "MAINTENANCE_REPORT_DATABASE_URL": roles["maintenance_report"],
                # Poll every second instead of every ten: the test waits less.
                "PREFECT_WORKER_QUERY_SECONDS": "1",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop_worker(worker: subprocess.Popen) -> None:
    # Prefect 3.8.8's worker answers the first SIGTERM with a graceful stop that can hang
    # when idle; a second signal kills it, as its own handler does.
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)


async def wait_until_final(run_ids) -> dict:
    """The final states of the runs; a generous timeout, no timing assertion."""
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    async with prefect_client() as client:
        while True:
            runs = {run_id: await client.read_flow_run(run_id) for run_id in run_ids}
            if all(run.state is not None and run.state.is_final() for run in runs.values()):
                return runs
            assert time.monotonic() < deadline, {str(run.id): run.state_name for run in runs.values()}
            await asyncio.sleep(1)


async def wait_for_task_runs(flow_run_id) -> list:
    """The task runs of a flow run, once the server has recorded them from its events."""
    deadline = time.monotonic() + 60
    async with prefect_client() as client:
        while True:
            task_runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            if task_runs or time.monotonic() > deadline:
                return task_runs
            await asyncio.sleep(1)
