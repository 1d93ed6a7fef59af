"""Retention on Prefect's default backend, SQLite, with both engines.

The SQLite server is shared by the whole session, so every run here is narrowed to the
flows this module seeds, and every check looks at those runs only.
"""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from flows.retention import retention
from localstack.seed import seed_messy_history
from tasks.database import connect
from tasks.prefect_api import prefect_client

pytestmark = pytest.mark.filterwarnings("ignore:.*does not refer to an OperatorClass:DeprecationWarning")

QUICK = {"max_runs_per_second": 0, "events_older_than_days": None, "heartbeat_events_older_than_days": None}


async def count(sql: str, ids) -> int:
    statement = sa.text(sql).bindparams(sa.bindparam("ids", expanding=True))
    async with connect() as connection:
        return (await connection.execute(statement, {"ids": [str(value) for value in ids]})).scalar_one()


async def existing(ids) -> set[uuid.UUID]:
    statement = sa.text("SELECT id FROM flow_run WHERE id IN :ids").bindparams(
        sa.bindparam("ids", expanding=True)
    )
    async with connect() as connection:
        found = await connection.execute(statement, {"ids": [str(value) for value in ids]})
        return {uuid.UUID(row.id) for row in found}


@pytest.mark.parametrize("engine", ["sql", "api"])
async def test_purge_on_sqlite(on_sqlite_server, engine):
    prefix = f"lite-{engine}"
    history = await seed_messy_history(on_sqlite_server.database_url, prefix=prefix, poison_pill=False)
    keep_tagged = history.old_finished[0]
    expected = (set(history.old_finished) | set(history.terminal_without_end_time)) - {keep_tagged}
    scope = {"engine": engine, "flow_names": history.flow_names, "exclude_tags": [f"{prefix}-keep"], **QUICK}

    dry = await retention(dry_run=True, **scope)
    assert dry.flow_runs_deleted == len(expected) == 16
    assert await existing(expected) == expected

    report = await retention(**scope)
    assert (report.engine, report.flow_runs_deleted) == (engine, 16)
    assert not await existing(expected)
    untouched = set(history.recent_finished + history.unknown_state + history.zombie_running + history.late)
    untouched |= {keep_tagged, history.old_finished_parent, *history.running_subflow_under_finished_parent}
    assert await existing(untouched) == untouched
    assert await count("SELECT count(*) FROM artifact WHERE flow_run_id IN :ids", expected) == 0
    assert await count("SELECT count(*) FROM task_run WHERE flow_run_id IN :ids", expected) == 0
    # Every collection of the seeded keys points at an artifact that exists.
    stale = await count(
        "SELECT count(*) FROM artifact_collection c WHERE c.key IN :ids "
        "AND NOT EXISTS (SELECT 1 FROM artifact a WHERE a.id = c.latest_id)",
        history.keyed_artifact_keys,
    )
    assert stale == 0
    if engine == "sql":
        assert await count("SELECT count(*) FROM log WHERE flow_run_id IN :ids", expected) == 0
        assert report.rows_deleted["task_run_state_cache"] == 3
    assert (await retention(**scope)).flow_runs_deleted == 0


async def test_orphan_sweep_on_sqlite(on_sqlite_server):
    gone = str(uuid.uuid4())
    async with prefect_client() as client:
        await client.create_flow_from_name("orphan-sweep")
    async with connect() as connection:
        for _ in range(3):
            await connection.execute(
                sa.text(
                    "INSERT INTO log (id, name, level, flow_run_id, message, timestamp, created, updated) "
                    "VALUES (:id, 'x', 20, :gone, 'orphan', '2026-01-01 00:00:00.000000', "
                    "'2026-01-01 00:00:00.000000', '2026-01-01 00:00:00.000000')"
                ),
                {"id": str(uuid.uuid4()), "gone": gone},
            )
        await connection.commit()
    # No run of this flow: only the sweep has work to do.
    options = {"engine": "sql", "include_orphans": True, "flow_names": ["orphan-sweep"], **QUICK}
    dry = await retention(dry_run=True, **options)
    assert dry.orphan_rows_deleted["log"] >= 3
    assert await count("SELECT count(*) FROM log WHERE flow_run_id IN :ids", [gone]) == 3
    report = await retention(**options)
    assert report.orphan_rows_deleted["log"] == dry.orphan_rows_deleted["log"]
    assert await count("SELECT count(*) FROM log WHERE flow_run_id IN :ids", [gone]) == 0
