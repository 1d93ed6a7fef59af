"""The ways to delete old runs that the retention flow is measured against.

Each deletes the expired runs of its own slice and nothing else:

- `docs_flow`: the retention flow of Prefect's database-maintenance guide, reimplemented
  from its text: runs whose start time is before the cutoff, in Completed, Failed or
  Cancelled (never Crashed), 100 at a time, one `DELETE` each, 0.5 s pause after every 10
  deletions and 1 s between batches. Restricted to the slice by deployment id.
- `api_delete`: one `DELETE /flow_runs/{id}` at a time, no pauses.
- `api_bulk_delete`: `POST /flow_runs/bulk_delete`, 50 runs a call.
- `prefect_db_vacuum`: Prefect's own `vacuum_old_flow_runs`, called directly on the
  benchmark database with a retention period that selects exactly its slice.
- `sql_ceiling`: the physical reference, not a way anyone should delete: one statement per
  batch deleting the batch's logs, artifacts, their collection rows and the runs (the
  rest cascades), with no check of states, trees or locks. What ours must come close to.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from prefect.server.database import PrefectDBInterface
from prefect.server.database.configurations import ENGINES, AsyncPostgresConfiguration
from prefect.server.database.orm_models import AsyncPostgresORMConfiguration
from prefect.server.database.query_components import AsyncPostgresQueryComponents
from prefect.server.services.db_vacuum import vacuum_old_flow_runs
from prefect.settings import temporary_settings
from sqlalchemy import text

from bench.slices import OLDEST_SLICE_CUTOFF_DAYS, Slice
from tasks.database import connect
from tasks.prefect_api import BULK_LIMIT, PAGE_SIZE, call, prefect_client
from tasks.retention.parameters import TERMINAL_STATES

# The guide's example leaves Crashed runs alone.
DOCS_FLOW_STATES = ("COMPLETED", "FAILED", "CANCELLED")
DOCS_FLOW_BATCH = 100


@dataclass(frozen=True)
class Workload:
    """What a method is asked to do: delete the runs of `slice` older than `older_than_days`."""

    slice: Slice
    database_url: str
    older_than_days: float
    batch_size: int


async def docs_flow(workload: Workload) -> None:
    cutoff = datetime.now(UTC) - timedelta(days=workload.older_than_days)
    flow_run_filter = FlowRunFilter(
        start_time=FlowRunFilterStartTime(before_=cutoff),
        state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType(state) for state in DOCS_FLOW_STATES])
        ),
        deployment_id=FlowRunFilterDeploymentId(any_=list(workload.slice.deployment_ids)),
    )
    async with prefect_client() as client:
        flow_runs = await client.read_flow_runs(flow_run_filter=flow_run_filter, limit=DOCS_FLOW_BATCH)
        while flow_runs:
            for batch_deleted, flow_run in enumerate(flow_runs, start=1):
                # Already gone counts as deleted, as in the guide.
                with contextlib.suppress(ObjectNotFound):
                    await client.delete_flow_run(flow_run.id)
                if batch_deleted % 10 == 0:
                    await asyncio.sleep(0.5)
            flow_runs = await client.read_flow_runs(flow_run_filter=flow_run_filter, limit=DOCS_FLOW_BATCH)
            await asyncio.sleep(1.0)


async def api_delete(workload: Workload) -> None:
    expired = workload.slice.api_filter(TERMINAL_STATES, workload.older_than_days)
    async with prefect_client() as client:
        while rows := await call(
            client, "POST", "/flow_runs/filter", json={"flow_runs": expired, "limit": PAGE_SIZE}
        ):
            for row in rows:
                await call(client, "DELETE", f"/flow_runs/{row['id']}")


async def api_bulk_delete(workload: Workload) -> None:
    expired = workload.slice.api_filter(TERMINAL_STATES, workload.older_than_days)
    async with prefect_client() as client:
        while True:
            answer = await call(
                client, "POST", "/flow_runs/bulk_delete", json={"flow_runs": expired, "limit": BULK_LIMIT}
            )
            if not answer["deleted"]:
                return


@contextlib.asynccontextmanager
async def prefect_server_database(database_url: str) -> AsyncIterator[PrefectDBInterface]:
    """Prefect's own database interface on `database_url`, as its server services get it."""
    configuration = AsyncPostgresConfiguration(connection_url=database_url)
    database = PrefectDBInterface(
        database_config=configuration,
        query_components=AsyncPostgresQueryComponents(),
        orm=AsyncPostgresORMConfiguration(),
    )
    try:
        yield database
    finally:
        # Its engines are cached per event loop; close them rather than leave connections open.
        for key in [key for key in ENGINES if key[1] == database_url]:
            await ENGINES.pop(key).dispose()


async def prefect_db_vacuum(workload: Workload) -> None:
    """`vacuum_old_flow_runs` on the benchmark database, with its default batch size (200)."""
    retention = {"server.services.db_vacuum.retention_period": timedelta(days=OLDEST_SLICE_CUTOFF_DAYS)}
    async with prefect_server_database(workload.database_url) as database:
        with temporary_settings(retention):
            await vacuum_old_flow_runs(db=database)


_CEILING_BATCH = text(
    """
    WITH batch AS (
        SELECT id FROM flow_run WHERE deployment_id = ANY(CAST(:deployment_ids AS uuid[])) LIMIT :batch_size
    ),
    logs AS (DELETE FROM log WHERE flow_run_id IN (SELECT id FROM batch)),
    artifacts AS (DELETE FROM artifact WHERE flow_run_id IN (SELECT id FROM batch) RETURNING id),
    collections AS (DELETE FROM artifact_collection WHERE latest_id IN (SELECT id FROM artifacts)),
    runs AS (DELETE FROM flow_run WHERE id IN (SELECT id FROM batch) RETURNING id)
    SELECT count(*) FROM runs
    """
)


async def sql_ceiling(workload: Workload) -> None:
    parameters = {
        "deployment_ids": [str(deployment_id) for deployment_id in workload.slice.deployment_ids],
        "batch_size": workload.batch_size,
    }
    async with connect(workload.database_url) as connection:
        while (await connection.execute(_CEILING_BATCH, parameters)).scalar_one():
            await connection.commit()
        await connection.commit()
