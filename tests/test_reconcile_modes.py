"""The reconcile flow where the database cannot be reached (API only, on a SQLite-backed
Prefect server, as on a server whose database the worker cannot see) and where Prefect's
own repair services run alongside it."""

from __future__ import annotations

import uuid

import pytest
from conftest import serving, use_server
from sqlalchemy import text

from flows.reconcile import reconcile_stuck_runs
from localstack.seed import seed_messy_history
from tasks.database import connect
from tasks.prefect_api import PrefectApiError, call, prefect_client, read_runs_by_id
from tasks.reconcile.rules import TERMINAL_STATES

LATE_AFTER_HOURS = 48


async def state_types(run_ids) -> dict[uuid.UUID, str]:
    async with prefect_client() as client:
        rows, unreadable = await read_runs_by_id(client, "flow_run", run_ids)
    assert not unreadable
    return {run_id: row["state_type"] for run_id, row in rows.items()}


async def test_api_only_mode_on_a_sqlite_server(sqlite_server):
    prefix = f"api-{uuid.uuid4().hex[:6]}"
    with serving(sqlite_server):
        history = await seed_messy_history(sqlite_server.database_url, prefix=prefix, poison_pill=False)
    with use_server(sqlite_server.api_url, None):
        passes = [
            await reconcile_stuck_runs(
                dry_run=dry_run, flow_names=history.flow_names, late_after_hours=LATE_AFTER_HOURS
            )
            for dry_run in (True, False, False)
        ]
        stuck = (
            history.unknown_state
            + history.stuck_pending
            + history.zombie_running
            + history.late
            + history.cancelling_subflows
            + history.running_subflow_under_finished_parent
        )
        healthy = history.healthy_running + history.running_without_heartbeat + history.fresh_pending
        states = await state_types(stuck + healthy + history.scheduled_tomorrow + history.fresh_cancelling)
    dry, real, second = passes
    assert dry.detection == real.detection == "api"
    assert "no database configured" in real.detection_note
    for dry_rule, real_rule in zip(dry.rules, real.rules, strict=True):
        assert set(dry_rule.ids("would fix")) == set(real_rule.ids("fixed")), dry_rule.rule
    assert real.rule("zombie").ids("fixed") and set(real.rule("zombie").ids("fixed")) == set(
        history.zombie_running
    )
    assert all(states[run_id] in TERMINAL_STATES for run_id in stuck)
    assert {states[run_id] for run_id in healthy} == {"RUNNING", "PENDING"}
    assert states[history.scheduled_tomorrow[0]] == "SCHEDULED"
    assert states[history.fresh_cancelling[0]] == "CANCELLING"
    assert second.found == 0


async def test_api_only_mode_repairs_a_poison_pill_it_cannot_read(sqlite_server):
    tag = f"poison-{uuid.uuid4().hex[:6]}"
    by_tag = {"flow_runs": {"tags": {"any_": [tag]}}}
    with serving(sqlite_server):
        async with prefect_client() as client:
            flow = await call(client, "POST", "/flows/", json={"name": tag})
            healthy, poisoned = [
                await call(
                    client,
                    "POST",
                    "/flow_runs/",
                    json={
                        "flow_id": flow["id"],
                        "tags": [tag],
                        "state": {"type": "RUNNING", "name": "Running"},
                    },
                )
                for _ in range(2)
            ]
        async with connect() as connection:
            await connection.execute(
                text("UPDATE flow_run SET state_timestamp = NULL WHERE id = :id"), {"id": poisoned["id"]}
            )
            await connection.commit()
    with use_server(sqlite_server.api_url, None):
        async with prefect_client() as client:
            with pytest.raises(PrefectApiError) as broken:
                await call(client, "POST", "/flow_runs/filter", json=by_tag)
        dry = await reconcile_stuck_runs(dry_run=True, tags=[tag])
        real = await reconcile_stuck_runs(tags=[tag])
        async with prefect_client() as client:
            listed = await call(client, "POST", "/flow_runs/filter", json=by_tag)
    assert broken.value.status_code == 500
    assert dry.rule("poison-pill").found == dry.rule("poison-pill").fixed == 1
    assert real.rule("poison-pill").ids("fixed") == [uuid.UUID(poisoned["id"])]
    assert {row["id"]: row["state_type"] for row in listed} == {
        healthy["id"]: "RUNNING",
        poisoned["id"]: "RUNNING",
    }


async def test_with_prefects_own_repair_services_running_too(fresh_server):
    server = fresh_server(services_on=True)
    with serving(server):
        history = await seed_messy_history(server.database_url, prefix="services")
        real = await reconcile_stuck_runs(late_after_hours=LATE_AFTER_HOURS)
        second = await reconcile_stuck_runs(late_after_hours=LATE_AFTER_HOURS)
        stuck = (
            history.unknown_state
            + history.cancelling_subflows
            + history.stuck_pending
            + history.zombie_running
            + history.late
            + history.running_subflow_under_finished_parent
        )
        healthy = history.healthy_running + history.running_without_heartbeat + history.fresh_pending
        states = await state_types(stuck + healthy)
    assert all(states[run_id] in TERMINAL_STATES for run_id in stuck)
    assert {states[run_id] for run_id in healthy} == {"RUNNING", "PENDING"}
    for rule in real.rules:
        # Prefect's services may have ended a run between detection and action: skipped.
        assert rule.found == rule.fixed + rule.skipped + rule.left, rule.rule
    assert real.fixed > 0
    assert second.found == 0
