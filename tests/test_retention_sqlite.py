"""Retention on Prefect's default backend, SQLite, with both engines.

The SQLite server is shared by the whole session, so every run here is narrowed to the
flows this module seeds, and every check looks at those runs only.
"""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from history import QUICK, dangling_collections, existing, scalar

from flows.retention import retention
from localstack.seed import seed_messy_history
from tasks.database import connect
from tasks.prefect_api import prefect_client

# SQLite's vacuum (ANALYZE) stays on here, and no heartbeat event goes either.
OPTIONS = {**QUICK, "vacuum": True, "heartbeat_events_older_than_days": None}


@pytest.mark.parametrize("engine", ["sql", "api"])
async def test_purge_on_sqlite(on_sqlite_server, engine):
    prefix = f"lite-{engine}"
    history = await seed_messy_history(on_sqlite_server.database_url, prefix=prefix, poison_pill=False)
    expected = history.expired_by_default() - {history.keep_tagged}
    scope = {
        "engine": engine,
        "flow_names": history.flow_names,
        "exclude_tags": [f"{prefix}-keep"],
        **OPTIONS,
    }

    dry = await retention(dry_run=True, **scope)
    assert dry.flow_runs_deleted == len(expected) == 16
    assert await existing(expected) == expected

    report = await retention(**scope)
    assert (report.engine, report.flow_runs_deleted) == (engine, 16)
    assert not await existing(expected)
    untouched = set(history.recent_finished + history.unknown_state + history.zombie_running + history.late)
    untouched |= {
        history.keep_tagged,
        history.old_finished_parent,
        *history.running_subflow_under_finished_parent,
    }
    assert await existing(untouched) == untouched
    assert await scalar("SELECT count(*) FROM artifact WHERE flow_run_id IN :ids", ids=expected) == 0
    assert await scalar("SELECT count(*) FROM task_run WHERE flow_run_id IN :ids", ids=expected) == 0
    # Every collection of the seeded keys points at an artifact that exists.
    assert await dangling_collections(history.keyed_artifact_keys) == 0
    if engine == "sql":
        assert await scalar("SELECT count(*) FROM log WHERE flow_run_id IN :ids", ids=expected) == 0
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
    options = {"engine": "sql", "include_orphans": True, "flow_names": ["orphan-sweep"], **OPTIONS}
    dry = await retention(dry_run=True, **options)
    assert dry.orphan_rows_deleted["log"] >= 3
    assert await scalar("SELECT count(*) FROM log WHERE flow_run_id IN :ids", ids=[gone]) == 3
    report = await retention(**options)
    assert report.orphan_rows_deleted["log"] == dry.orphan_rows_deleted["log"]
    assert await scalar("SELECT count(*) FROM log WHERE flow_run_id IN :ids", ids=[gone]) == 0
