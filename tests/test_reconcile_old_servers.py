"""The reconcile flow on Prefect servers older than 3.6.16, which have no `bulk_set_state`.

The story, on each old server: the messy history seeded, then a dry run, a real pass and a
second pass with no database (API only). Every category ends where the README's table
says; the poison pill, which no listing can show, is found by its Running event, named in
the dry run, and repaired by its id. A poison pill whose events are gone is reported as
skipped with the reason, and repaired once the flow has the database. A rule that fails
(a read-only role without access to `events`) is reported, the next rules still run, and
the run ends Failed naming it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import pytest
from conftest import ServerFactory, serving, use_server
from history import (
    RunState,
    assert_ended,
    assert_untouched,
    create_flow_run,
    list_all_flow_runs,
    move_back,
    run_states,
    wait_for_event,
)
from prefect.client.schemas.objects import State, StateType
from sqlalchemy import text
from sqlalchemy.engine import make_url

from flows.reconcile import reconcile_stuck_runs
from localstack.seed import MessyHistory, seed_messy_history
from tasks.database import connect
from tasks.prefect_api import BULK_FLOW_RUN_ROUTES, call, prefect_client, version_tuple
from tasks.reconcile.report import REPORT_KEY, ReconcileReport
from tasks.reconcile.unreadable import RUNNING_EVENT

# The oldest supported server; the support matrix runs the same story on every version.
OLD_VERSIONS = ("3.1.15",)
LATE_AFTER_HOURS = 48


@pytest.fixture(scope="module", params=OLD_VERSIONS)
def old_server(request, stack):
    assert version_tuple(request.param) < BULK_FLOW_RUN_ROUTES
    factory = ServerFactory(stack)
    try:
        yield factory(version=request.param)
    finally:
        factory.close()


async def reconcile(**parameters) -> tuple[State, ReconcileReport]:
    state = await reconcile_stuck_runs(**parameters, return_state=True)
    return state, await state.result(raise_on_failure=False)


async def poison(database_url: str, run_id: uuid.UUID) -> None:
    async with connect(database_url) as connection:
        await connection.execute(
            text("UPDATE flow_run SET state_timestamp = NULL WHERE id = :id"), {"id": str(run_id)}
        )
        await connection.commit()


@dataclass
class Passes:
    history: MessyHistory
    before: dict[uuid.UUID, RunState]
    dry: ReconcileReport
    real_state: State
    real: ReconcileReport
    after_real: dict[uuid.UUID, RunState]
    second: ReconcileReport


@pytest.fixture(scope="module")
async def passes(old_server) -> Passes:
    database_url = old_server.database_url
    with serving(old_server):
        history = await seed_messy_history(database_url, prefix="old")
    (poisoned,) = history.null_state_timestamp
    await wait_for_event(database_url, poisoned, RUNNING_EVENT)
    before = await run_states(database_url)
    with use_server(old_server.api_url, None):
        _, dry = await reconcile(dry_run=True, late_after_hours=LATE_AFTER_HOURS)
        real_state, real = await reconcile(late_after_hours=LATE_AFTER_HOURS)
        after_real = await run_states(database_url)
        _, second = await reconcile(late_after_hours=LATE_AFTER_HOURS)
    return Passes(history, before, dry, real_state, real, after_real, second)


async def test_api_only_every_category_ends_where_the_rule_table_says(passes):
    history = passes.history
    assert passes.real.detection == "api"
    assert passes.real_state.type == StateType.COMPLETED, passes.real_state.message
    assert not passes.real.failed_rules()
    assert_ended(passes, history.unknown_state, "CRASHED", "unknown-state")
    assert_ended(passes, history.cancelling_subflows, "CANCELLED", "stuck-cancelling")
    assert_ended(passes, history.stuck_pending, "CRASHED", "stuck-pending")
    assert_ended(passes, history.zombie_running, "CRASHED", "zombie")
    assert_ended(passes, history.late, "CANCELLED", "late", state_name="Expired")
    assert_ended(passes, history.running_subflow_under_finished_parent, "CRASHED", "orphaned-subflow")
    assert_ended(passes, history.open_task_runs_in_finished_flow, "COMPLETED", "open-task-run")
    assert_untouched(
        passes,
        history.old_finished
        + history.terminal_without_end_time
        + history.fresh_cancelling
        + history.fresh_pending
        + history.healthy_running
        + history.running_without_heartbeat
        + history.scheduled_tomorrow,
    )
    assert passes.second.found == 0


async def test_the_poison_pill_is_found_by_its_event_named_in_the_dry_run_and_repaired(passes, old_server):
    (poisoned,) = passes.history.null_state_timestamp
    dry, real = passes.dry.rule("poison-pill"), passes.real.rule("poison-pill")
    assert dry.ids("would fix") == real.ids("fixed") == [poisoned]
    assert (dry.found, dry.skipped, real.skipped) == (1, 0, 0)
    assert passes.before[poisoned].state_timestamp is None
    assert passes.after_real[poisoned].state_type == "RUNNING"
    assert passes.after_real[poisoned].state_timestamp is not None
    assert "rule poison-pill:" in passes.after_real[poisoned].message
    for dry_rule, real_rule in zip(passes.dry.rules, passes.real.rules, strict=True):
        assert set(dry_rule.ids("would fix")) == set(real_rule.ids("fixed")), dry_rule.rule
    with use_server(old_server.api_url, None):
        assert await list_all_flow_runs() > 0


async def test_a_poison_pill_without_events_is_skipped_with_the_reason_until_the_database_is_given(
    passes, old_server
):
    tag = f"no-events-{uuid.uuid4().hex[:6]}"
    database_url = old_server.database_url
    with serving(old_server):
        run_id = await create_flow_run(tag, ["PENDING", "RUNNING"], tags=[tag])
        await wait_for_event(database_url, run_id, RUNNING_EVENT)
    async with connect(database_url) as connection:
        # What the server's event retention does once the run has been Running long enough.
        await connection.execute(
            text("DELETE FROM events WHERE resource_id = :resource"),
            {"resource": f"prefect.flow-run.{run_id}"},
        )
        await connection.commit()
    await poison(database_url, run_id)
    with use_server(old_server.api_url, None):
        dry = (await reconcile(dry_run=True, tags=[tag]))[1].rule("poison-pill")
        api_only = (await reconcile(tags=[tag]))[1].rule("poison-pill")
    with serving(old_server):
        with_database_state, with_database = await reconcile(tags=[tag])
    for report in (dry, api_only):
        assert (report.found, report.fixed, report.skipped) == (1, 0, 1)
        (note,) = report.notes
        assert "cannot be repaired through the API" in note and "no bulk_set_state" in note
        assert "Give the flow database access" in note
    assert with_database_state.type == StateType.COMPLETED
    assert with_database.rule("poison-pill").ids("fixed") == [run_id]
    assert (await run_states(database_url))[run_id].state_timestamp is not None


@pytest.fixture
async def reader_without_events(old_server):
    """A read-only role as a DBA might grant it, forgetting `events`: detection by SQL works
    for every rule but those reading heartbeats, which the server refuses."""
    role, password = f"reader_{uuid.uuid4().hex[:8]}", f"secret-{uuid.uuid4().hex}"
    async with connect(old_server.database_url) as connection:
        for statement in (
            f"CREATE ROLE {role} LOGIN PASSWORD '{password}'",
            f"GRANT USAGE ON SCHEMA public TO {role}",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}",
            f"REVOKE SELECT ON events FROM {role}",
        ):
            await connection.execute(text(statement))
        await connection.commit()
    url = make_url(old_server.database_url).set(username=role, password=password)
    try:
        yield url.render_as_string(hide_password=False), password
    finally:
        async with connect(old_server.database_url) as connection:
            await connection.execute(text(f"DROP OWNED BY {role}"))
            await connection.execute(text(f"DROP ROLE {role}"))
            await connection.commit()


async def test_a_failing_rule_is_reported_the_others_go_on_and_the_run_fails(
    passes, old_server, reader_without_events
):
    reader_url, password = reader_without_events
    flow_name = f"half-{uuid.uuid4().hex[:6]}"
    database_url = old_server.database_url
    with serving(old_server):
        long_run = await create_flow_run(flow_name, ["PENDING", "RUNNING"])
        holder = await create_flow_run(flow_name, ["PENDING", "RUNNING"])
        async with prefect_client() as client:
            task_run = await call(
                client,
                "POST",
                "/task_runs/",
                json={
                    "flow_run_id": str(holder),
                    "task_key": "t",
                    "dynamic_key": "0",
                    "state": {"type": "RUNNING"},
                },
            )
            await call(
                client,
                "POST",
                f"/flow_runs/{holder}/set_state",
                json={"state": {"type": "COMPLETED", "name": "Completed"}},
            )
        await move_back(database_url, [long_run, holder], hours=5)
    with use_server(old_server.api_url, reader_url):
        state, report = await reconcile(flow_names=[flow_name], max_runtime_hours=4)
        async with prefect_client() as client:
            (artifact,) = await call(
                client,
                "POST",
                "/artifacts/filter",
                json={"artifacts": {"key": {"any_": [REPORT_KEY]}}, "sort": "CREATED_DESC", "limit": 1},
            )
    assert report.detection == "sql"
    assert report.failed_rules() == ["zombie", "orphaned-subflow"]
    assert "permission denied for table events" in report.rule("zombie").error
    # The rules after the failed ones still ran.
    assert report.rule("max-runtime").ids("fixed") == [long_run]
    assert report.rule("open-task-run").ids("fixed") == [uuid.UUID(task_run["id"])]
    states = await run_states(database_url)
    assert states[long_run].state_type == "CRASHED"
    assert states[uuid.UUID(task_run["id"])].state_type == "COMPLETED"
    assert state.type == StateType.FAILED
    assert "zombie: " in state.message and "orphaned-subflow: " in state.message
    assert (
        "Zombie Running failed" in artifact["data"] and "rules that failed: zombie" in artifact["description"]
    )
    for published in (state.message, artifact["data"], json.dumps(report.model_dump(mode="json"))):
        assert password not in published
