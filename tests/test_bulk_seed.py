"""The benchmark seeder writes runs Prefect itself can read, with everything a run owns."""

from __future__ import annotations

from sqlalchemy import text

from localstack.bulk_seed import EVENTS_PER_RUN, LOGS_PER_RUN, TASK_RUNS_PER_RUN, bulk_seed
from tasks.database import connect
from tasks.prefect_api import call, prefect_client


async def test_bulk_seed_writes_complete_runs(on_fresh_server):
    result = await bulk_seed(
        on_fresh_server.database_url, 250, min_age_days=10, max_age_days=100, chunk_size=100
    )
    assert result.runs == 250
    expected = {
        "flow_run": 250,
        "flow_run_state": 500,
        "task_run": 250 * TASK_RUNS_PER_RUN,
        "task_run_state": 2 * 250 * TASK_RUNS_PER_RUN,
        "log": 250 * LOGS_PER_RUN,
        "artifact": 250,
        "events": 250 * EVENTS_PER_RUN,
        "event_resources": 2 * 250 * EVENTS_PER_RUN,
    }
    async with connect() as connection:
        for table, count in expected.items():
            assert (await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one() == count, (
                table
            )
        ages = (
            await connection.execute(
                text("SELECT min(now() - end_time), max(now() - end_time) FROM flow_run")
            )
        ).one()
        collections = (
            await connection.execute(text("SELECT count(*) FROM artifact_collection"))
        ).scalar_one()
        dangling = (
            await connection.execute(
                text(
                    "SELECT count(*) FROM flow_run f LEFT JOIN flow_run_state s ON s.id = f.state_id "
                    "WHERE s.id IS NULL"
                )
            )
        ).scalar_one()
    assert ages[0].total_seconds() / 86400 >= 9.9 and ages[1].total_seconds() / 86400 <= 100.1
    assert collections == 5  # keys repeat: every tenth run, 5 distinct keys
    assert dangling == 0
    async with prefect_client() as client:
        rows = await call(client, "POST", "/flow_runs/filter", json={"limit": 200})
    assert len(rows) == 200
    assert {row["state"]["type"] for row in rows} <= {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
