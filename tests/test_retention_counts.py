"""What a retention run says besides the runs: the artifact collections it removes or
re-points, and the space the deleted rows took, the dry run's figures equal to the real run's.

The collections are tested on a history of three keys: one whose latest artifact belongs to
an expired run while an older artifact of a young run stays (re-pointed), one whose every
artifact goes (removed), and one whose latest artifact belongs to the oldest run, so that a
first batch re-points its collection and a later batch removes it (counted once, removed).
The space is checked against what PostgreSQL's own page inspection (`pgstattuple`) sees the
tables lose.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from history import QUICK, PlannedRun, create_history, database_of, rows

from flows.retention import retention
from tasks.database import connect
from tasks.prefect_api import call, prefect_client
from tasks.retention.artifact_collections import REMOVED, REPOINTED
from tasks.retention.parameters import RetentionParameters
from tasks.retention.rate_limit import Throttle
from tasks.retention.report import RetentionTotals
from tasks.retention.selection import build_policy, expired_batches, open_engine


async def collection_history(prefix: str):
    kept, removed, twice = f"{prefix}-kept", f"{prefix}-removed", f"{prefix}-twice"
    plans = [
        # An older artifact of `kept`, on a young run that stays.
        PlannedRun("COMPLETED", 0.5, artifact_key=kept, name="young"),
        # The latest artifact of `kept`, on an expired run.
        PlannedRun("COMPLETED", 90, artifact_key=kept, name="latest of kept"),
        PlannedRun("FAILED", 91, artifact_key=removed),
        PlannedRun("COMPLETED", 92, artifact_key=removed),
        # `twice`: the older artifact on the younger expired run, the latest on the oldest run.
        PlannedRun("COMPLETED", 80, artifact_key=twice),
        PlannedRun("COMPLETED", 95, artifact_key=twice),
    ]
    return await create_history(prefix, plans), (kept, removed, twice)


@pytest.mark.parametrize("engine", ["sql", "api"])
async def test_the_dry_run_counts_the_collections_the_real_run_removes_or_re_points(on_module_server, engine):
    history, (kept, removed, twice) = await collection_history(f"collections-{engine}")
    # A batch per run, oldest first: `twice` is re-pointed by the first batch, removed by the last.
    scope = {"flow_names": history.flow_names, "batch_size": 1, "engine": engine, **QUICK}

    dry = await retention(dry_run=True, **scope)
    report = await retention(**scope)

    assert report.flow_runs_deleted == dry.flow_runs_deleted == 5
    assert {table: report.rows_deleted.get(table) for table in (REMOVED, REPOINTED)} == {
        REMOVED: 2,
        REPOINTED: 1,
    }
    assert dry.rows_deleted == report.rows_deleted
    collections = await rows(
        "SELECT c.key, a.flow_run_id FROM artifact_collection c LEFT JOIN artifact a ON a.id = c.latest_id "
        "WHERE c.key IN :keys",
        keys=[kept, removed, twice],
    )
    assert [(row.key, row.flow_run_id) for row in collections] == [(kept, history.named["young"])]


async def test_the_space_of_the_deleted_rows_is_what_the_tables_lose(on_module_server, module_server, stack):
    history = await create_history(
        "space", [PlannedRun("COMPLETED", 90, artifact_key="space-report") for _ in range(30)]
    )
    # An artifact too big and too random to stay in its row: its data goes to the table's TOAST.
    async with prefect_client() as client:
        await call(
            client,
            "POST",
            "/artifacts/",
            json={
                "key": "space-big",
                "type": "markdown",
                "data": base64.b64encode(os.urandom(9_000)).decode(),
                "flow_run_id": str(history.ids[0]),
            },
        )
    stack.postgres.psql("CREATE EXTENSION IF NOT EXISTS pgstattuple", database=database_of(module_server))
    parameters = RetentionParameters(flow_names=tuple(history.flow_names), batch_size=7)

    dry = await purge(parameters, dry_run=True)
    tables = sorted(table for table, count in dry.table_rows.items() if count)
    assert {"flow_run", "flow_run_state", "log", "artifact"} <= set(tables)
    before = await live_tuples(tables)
    real = await purge(parameters, dry_run=False)
    after = await live_tuples(tables)

    assert real.bytes == dry.bytes and real.table_rows == dry.table_rows
    assert after["artifact"].toast_rows < before["artifact"].toast_rows, (
        "the big artifact's data was in TOAST"
    )
    for table in tables:
        rows = before[table].rows - after[table].rows
        chunks = before[table].toast_rows - after[table].toast_rows
        stored = before[table].bytes - after[table].bytes
        assert rows == real.table_rows[table], table
        # What pgstattuple reads off the pages is the rows' stored bytes; each row takes a
        # 4-byte line pointer besides and up to 7 bytes to align it, and each TOAST chunk
        # (about 2 kB) adds under 40 bytes of its own header and numbers.
        assert stored + 4 * rows - 40 * chunks <= real.bytes[table] <= stored + 11 * rows, table


async def purge(parameters: RetentionParameters, *, dry_run: bool) -> RetentionTotals:
    """The flow's batches, outside any flow run: nothing else writes to the run tables meanwhile."""
    totals = RetentionTotals()
    async with open_engine("sql", Throttle(0)) as engine:
        policy = await build_policy(engine, parameters)
        async for batch in expired_batches(engine, policy, parameters.batch_size):
            totals.add(await engine.process_batch(batch.runs, policy, dry_run=dry_run))
    return totals


@dataclass
class LiveTuples:
    rows: int
    toast_rows: int
    # Of the rows and their TOAST chunks.
    bytes: int


async def live_tuples(tables: list[str]) -> dict[str, LiveTuples]:
    """Per table, its live rows and their bytes as pgstattuple reads them off the pages,
    with the chunks of its TOAST table."""
    found = {}
    async with connect() as connection:
        for table in tables:
            heap = (
                await connection.execute(
                    sa.text(f"SELECT tuple_count, tuple_len FROM pgstattuple('{table}')")
                )
            ).one()
            toast = (
                await connection.execute(
                    sa.text(
                        "SELECT coalesce(sum(s.tuple_count), 0), coalesce(sum(s.tuple_len), 0) FROM pg_class c, "
                        "LATERAL pgstattuple(c.reltoastrelid) s WHERE c.oid = CAST(:table AS regclass) "
                        "AND c.reltoastrelid <> 0"
                    ),
                    {"table": table},
                )
            ).one()
            found[table] = LiveTuples(int(heap[0]), int(toast[0]), int(heap[1]) + int(toast[1]))
    return found
