"""The messy history really holds every situation the maintenance flows are built for."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from conftest import serving
from history import scalar
from sqlalchemy import bindparam, text

from localstack.seed import TERMINAL_STATES, MessyHistory, seed_messy_history
from tasks.database import connect
from tasks.prefect_api import PrefectApiError, call, prefect_client


@pytest.fixture(scope="module")
async def history(module_server) -> MessyHistory:
    with serving(module_server):
        return await seed_messy_history(module_server.database_url, prefix="seedtest")


async def runs_by_id(ids) -> dict[str, dict]:
    async with connect() as connection:
        rows = (
            await connection.execute(
                text(
                    "SELECT id::text AS id, state_type::text AS state_type, state_name, state_id, "
                    "state_timestamp, start_time, end_time, expected_start_time, created, parent_task_run_id "
                    "FROM flow_run WHERE id IN :ids"
                ).bindparams(bindparam("ids", expanding=True)),
                {"ids": [str(i) for i in ids]},
            )
        ).mappings()
        return {row["id"]: dict(row) for row in rows}


async def read_run(run_id) -> dict:
    async with prefect_client() as client:
        return await call(client, "GET", f"/flow_runs/{run_id}")


async def parent_of(run_id) -> str | None:
    async with connect() as connection:
        return (
            await connection.execute(
                text(
                    "SELECT t.flow_run_id::text FROM flow_run f JOIN task_run t ON t.id = f.parent_task_run_id "
                    "WHERE f.id = :id"
                ),
                {"id": str(run_id)},
            )
        ).scalar_one_or_none()


async def test_old_finished_runs_own_task_runs_logs_artifacts_and_cache(history, on_module_server):
    now = datetime.now(UTC)
    runs = await runs_by_id(history.old_finished)
    assert len(runs) == len(history.old_finished) >= 12
    assert {row["state_type"] for row in runs.values()} == set(TERMINAL_STATES)
    assert all(row["end_time"] < now - timedelta(days=35) for row in runs.values())
    assert set(history.old_finished_by_state) == set(TERMINAL_STATES)
    ids = [str(i) for i in history.old_finished]
    assert await scalar("SELECT count(*) FROM task_run WHERE flow_run_id IN :ids", ids=ids) >= 2 * 12
    assert await scalar("SELECT count(*) FROM log WHERE flow_run_id IN :ids", ids=ids) >= 3 * 12
    assert await scalar("SELECT count(*) FROM artifact WHERE flow_run_id IN :ids", ids=ids) >= 12
    assert (
        await scalar(
            "SELECT count(*) FROM artifact_collection WHERE key IN :ids", ids=history.keyed_artifact_keys
        )
        == len(history.keyed_artifact_keys)
        >= 3
    )
    assert (
        await scalar("SELECT count(*) FROM task_run_state_cache WHERE cache_key LIKE 'seedtest-cache-%'") == 3
    )
    deployments = {str(row["id"]) for row in await _deployment_rows(history)}
    assert deployments == {str(i) for i in history.deployments.values()}


async def _deployment_rows(history):
    async with connect() as connection:
        return (
            (
                await connection.execute(
                    text(
                        "SELECT DISTINCT deployment_id AS id FROM flow_run WHERE id IN :ids AND deployment_id IS NOT NULL"
                    ).bindparams(bindparam("ids", expanding=True)),
                    {"ids": [str(i) for i in history.old_finished]},
                )
            )
            .mappings()
            .all()
        )


async def test_old_tree_is_linked_parent_to_grandchild(history, on_module_server):
    child, grandchild = history.old_subflows
    assert await parent_of(grandchild) == str(child)
    assert await parent_of(child) in {str(i) for i in history.old_finished}


async def test_recent_runs_are_recent(history, on_module_server):
    runs = await runs_by_id(history.recent_finished)
    assert all(row["state_type"] in TERMINAL_STATES for row in runs.values())
    assert all(row["end_time"] > datetime.now(UTC) - timedelta(days=7) for row in runs.values())


async def test_unknown_runs_have_no_state_in_the_api(history, on_module_server):
    runs = await runs_by_id(history.unknown_state)
    assert all(row["state_id"] is None and row["state_type"] == "COMPLETED" for row in runs.values())
    for run_id in history.unknown_state:
        assert (await read_run(run_id))["state"] is None


async def test_cancelled_parent_with_subflows_stuck_cancelling(history, on_module_server):
    parent = await read_run(history.cancelled_parent)
    assert parent["state"]["type"] == "CANCELLED"
    for run_id in history.cancelling_subflows:
        run = await read_run(run_id)
        assert run["state"]["type"] == "CANCELLING"
        assert datetime.fromisoformat(run["state"]["timestamp"]) < datetime.now(UTC) - timedelta(hours=2)
        assert await parent_of(run_id) == str(history.cancelled_parent)
    (fresh_cancelling,) = history.fresh_cancelling
    fresh = await read_run(fresh_cancelling)
    assert fresh["state"]["type"] == "CANCELLING"
    assert datetime.fromisoformat(fresh["state"]["timestamp"]) > datetime.now(UTC) - timedelta(minutes=30)


async def test_pending_runs_stuck_and_fresh(history, on_module_server):
    now = datetime.now(UTC)
    for run_id in history.stuck_pending:
        state = (await read_run(run_id))["state"]
        assert state["type"] == "PENDING"
        assert datetime.fromisoformat(state["timestamp"]) < now - timedelta(hours=4)
    (fresh_pending,) = history.fresh_pending
    state = (await read_run(fresh_pending))["state"]
    assert state["type"] == "PENDING" and datetime.fromisoformat(state["timestamp"]) > now - timedelta(
        minutes=30
    )


async def _latest_heartbeat(run_id):
    return await scalar(
        "SELECT max(occurred) FROM events WHERE event = 'prefect.flow-run.heartbeat' AND resource_id = :resource",
        resource=f"prefect.flow-run.{run_id}",
    )


async def test_running_runs_zombie_healthy_and_without_heartbeat(history, on_module_server):
    now = datetime.now(UTC)
    for run_id in history.zombie_running:
        assert (await read_run(run_id))["state"]["type"] == "RUNNING"
        assert await _latest_heartbeat(run_id) < now - timedelta(hours=2)
    (healthy,) = history.healthy_running
    assert (await read_run(healthy))["state"]["type"] == "RUNNING"
    assert await _latest_heartbeat(healthy) > now - timedelta(minutes=10)
    (silent,) = history.running_without_heartbeat
    assert (await read_run(silent))["state"]["type"] == "RUNNING"
    assert await _latest_heartbeat(silent) is None


async def test_late_runs_and_tomorrow(history, on_module_server):
    now = datetime.now(UTC)
    for run_id in history.late:
        run = await read_run(run_id)
        assert run["state"]["type"] == "SCHEDULED" and run["state"]["name"] == "Late"
        assert datetime.fromisoformat(run["expected_start_time"]) < now - timedelta(days=2)
    (scheduled_tomorrow,) = history.scheduled_tomorrow
    tomorrow = await read_run(scheduled_tomorrow)
    assert datetime.fromisoformat(tomorrow["expected_start_time"]) > now + timedelta(hours=12)


async def test_poison_pill_breaks_listing(history, on_module_server):
    runs = await runs_by_id(history.null_state_timestamp)
    assert all(row["state_timestamp"] is None and row["state_type"] == "RUNNING" for row in runs.values())
    async with prefect_client() as client:
        with pytest.raises(PrefectApiError) as raised:
            await call(client, "POST", "/flow_runs/filter", json={"limit": 200})
    assert raised.value.status_code == 500


async def test_terminal_runs_without_end_time(history, on_module_server):
    runs = await runs_by_id(history.terminal_without_end_time)
    assert all(row["end_time"] is None and row["state_type"] in TERMINAL_STATES for row in runs.values())
    assert all(row["state_timestamp"] < datetime.now(UTC) - timedelta(days=60) for row in runs.values())


async def test_running_subflow_under_old_finished_parent(history, on_module_server):
    parent = await read_run(history.old_finished_parent)
    assert parent["state"]["type"] == "FAILED"
    assert datetime.fromisoformat(parent["end_time"]) < datetime.now(UTC) - timedelta(days=30)
    for run_id in history.running_subflow_under_finished_parent:
        assert (await read_run(run_id))["state"]["type"] == "RUNNING"
        assert await parent_of(run_id) == str(history.old_finished_parent)


async def test_open_task_runs_inside_finished_flow_runs(history, on_module_server):
    async with prefect_client() as client:
        for task_run_id in history.open_task_runs_in_finished_flow:
            task_run = await call(client, "GET", f"/task_runs/{task_run_id}")
            assert task_run["state"]["type"] == "RUNNING"
            flow_run = await call(client, "GET", f"/flow_runs/{task_run['flow_run_id']}")
            assert flow_run["state"]["type"] == "COMPLETED"


async def test_seeding_without_poison_pill_keeps_listing_working(on_fresh_server):
    history = await seed_messy_history(
        on_fresh_server.database_url, prefix="nopill", poison_pill=False, old_runs_per_deployment=1
    )
    assert history.null_state_timestamp == []
    async with prefect_client() as client:
        rows = await call(
            client,
            "POST",
            "/flow_runs/filter",
            json={"flows": {"name": {"any_": history.flow_names}}, "limit": 200},
        )
    assert {str(i) for i in history.old_finished} <= {row["id"] for row in rows}
