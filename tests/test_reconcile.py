"""The reconcile flow on a messy history, against a real PostgreSQL and a real Prefect server
whose own repair services (cancellation cleanup, late runs) are off: the flow does the work.

The story: a dry run first (nothing changes, the report says what would be done), then a
real pass (every stuck run ends in the right state, healthy ones are untouched, the
poison pill no longer breaks listing), then a second pass that finds nothing.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from conftest import serving
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
from sqlalchemy import bindparam, text

from flows.reconcile import reconcile_stuck_runs
from localstack.seed import MessyHistory, seed_messy_history
from tasks.database import connect
from tasks.parameters import ParameterError
from tasks.prefect_api import HEARTBEAT_EVENT, PrefectApiError, call, prefect_client
from tasks.reconcile.actions import RECONCILED_EVENT, end_stuck_runs
from tasks.reconcile.detect import choose_detection_source, find_stuck_runs, resolve_scope
from tasks.reconcile.parameters import ReconcileParameters
from tasks.reconcile.passes import count_stuck_runs
from tasks.reconcile.report import REPORT_KEY, ReconcileReport, RuleReport
from tasks.reconcile.rules import RULES_BY_NAME

LATE_AFTER_HOURS = 48


@dataclass
class Passes:
    history: MessyHistory
    database_url: str
    counts: dict[str, int]
    listing_failed_before: bool
    before: dict[uuid.UUID, RunState]
    dry: ReconcileReport
    after_dry: dict[uuid.UUID, RunState]
    real: ReconcileReport
    after_real: dict[uuid.UUID, RunState]
    second: ReconcileReport


@pytest.fixture(scope="module")
async def passes(module_server) -> Passes:
    with serving(module_server):
        database_url = module_server.database_url
        history = await seed_messy_history(database_url, prefix="stuck")
        counts = await count_stuck_runs()
        try:
            await list_all_flow_runs()
            listing_failed_before = False
        except PrefectApiError as error:
            listing_failed_before = error.status_code == 500
        before = await run_states(database_url)
        dry = await reconcile_stuck_runs(dry_run=True, late_after_hours=LATE_AFTER_HOURS)
        after_dry = await run_states(database_url)
        real = await reconcile_stuck_runs(late_after_hours=LATE_AFTER_HOURS)
        after_real = await run_states(database_url)
        second = await reconcile_stuck_runs(late_after_hours=LATE_AFTER_HOURS)
    return Passes(
        history, database_url, counts, listing_failed_before, before, dry, after_dry, real, after_real, second
    )


async def test_the_dry_run_changes_nothing_and_says_what_the_real_pass_does(passes):
    assert passes.dry.dry_run and passes.dry.detection == "sql"
    # The dry run's own flow run and task runs are the only new rows.
    assert {run_id: passes.after_dry[run_id] for run_id in passes.before} == passes.before
    assert passes.dry.found == passes.real.found > 0
    for dry_rule, real_rule in zip(passes.dry.rules, passes.real.rules, strict=True):
        assert set(dry_rule.ids("would fix")) == set(real_rule.ids("fixed")), dry_rule.rule
        assert real_rule.skipped == real_rule.left == 0


async def test_a_second_pass_finds_nothing(passes):
    assert passes.second.found == 0
    assert passes.second.fixed == 0


async def test_count_for_the_health_report_matches_the_dry_run(passes):
    defaults = ReconcileParameters()
    # Runs only: the health report shows concurrency slots in a check of their own.
    enabled_by_default = [
        rule
        for rule in passes.dry.rules
        if RULES_BY_NAME[rule.rule].is_enabled(defaults) and RULES_BY_NAME[rule.rule].judge is not None
    ]
    assert passes.counts == {rule.rule: rule.found for rule in enabled_by_default}
    assert passes.counts["unknown-state"] == len(passes.history.unknown_state)


async def test_unknown_state_runs_get_a_real_terminal_state(passes):
    assert_ended(passes, passes.history.unknown_state, "CRASHED", "unknown-state")
    assert all(passes.before[run_id].state_id is None for run_id in passes.history.unknown_state)
    assert_untouched(passes, passes.history.old_finished + passes.history.terminal_without_end_time)


async def test_stuck_cancelling_runs_are_cancelled_and_fresh_ones_left(passes):
    assert_ended(passes, passes.history.cancelling_subflows, "CANCELLED", "stuck-cancelling")
    assert_untouched(passes, passes.history.fresh_cancelling)
    for run_id in passes.history.cancelling_subflows:
        message = passes.after_real[run_id].message
        assert "in Cancelling since" in message and "(3 h" in message


async def test_stuck_pending_runs_crash_and_fresh_ones_are_left(passes):
    assert_ended(passes, passes.history.stuck_pending, "CRASHED", "stuck-pending")
    assert_untouched(passes, passes.history.fresh_pending)


async def test_zombies_crash_and_runs_with_a_fresh_or_no_heartbeat_are_left(passes):
    assert_ended(passes, passes.history.zombie_running, "CRASHED", "zombie")
    for run_id in passes.history.zombie_running:
        assert "no heartbeat since" in passes.after_real[run_id].message
    assert_untouched(passes, passes.history.healthy_running + passes.history.running_without_heartbeat)


async def test_late_runs_expire_and_tomorrows_run_is_left(passes):
    assert_ended(passes, passes.history.late, "CANCELLED", "late", state_name="Expired")
    assert_untouched(passes, passes.history.scheduled_tomorrow)


async def test_orphaned_subflow_under_a_finished_parent_crashes(passes):
    assert_ended(passes, passes.history.running_subflow_under_finished_parent, "CRASHED", "orphaned-subflow")
    assert_untouched(passes, passes.history.old_subflows)


async def test_open_task_run_in_a_finished_flow_run_ends_like_it(passes):
    assert_ended(passes, passes.history.open_task_runs_in_finished_flow, "COMPLETED", "open-task-run")
    assert set(passes.dry.rule("open-task-run").ids()) == set(passes.history.open_task_runs_in_finished_flow)
    # The cancelled parent's task runs stand for its stuck subflows: Prefect gives them every
    # state of their subflow, so they are not this rule's, and they still end Cancelled.
    async with connect(passes.database_url) as connection:
        wrappers = (
            (
                await connection.execute(
                    text("SELECT id FROM task_run WHERE flow_run_id = :parent"),
                    {"parent": str(passes.history.cancelled_parent)},
                )
            )
            .scalars()
            .all()
        )
    assert wrappers and all(passes.before[task_id].state_type == "CANCELLING" for task_id in wrappers)
    assert all(passes.after_real[task_id].state_type == "CANCELLED" for task_id in wrappers)


async def test_the_poison_pill_no_longer_breaks_listing(passes, module_server):
    assert passes.listing_failed_before
    (poisoned,) = passes.history.null_state_timestamp
    assert passes.before[poisoned].state_timestamp is None
    assert passes.after_real[poisoned].state_type == "RUNNING"
    assert passes.after_real[poisoned].state_timestamp is not None
    assert poisoned in passes.real.rule("poison-pill").ids("fixed")
    with serving(module_server):
        assert await list_all_flow_runs() > 0


async def test_every_fixed_run_has_a_reconciled_event(passes):
    fixed = [
        (f"prefect.{action.run_kind.replace('_', '-')}.{action.run_id}", rule.rule)
        for rule in passes.real.rules
        for action in rule.runs
        if action.outcome == "fixed"
    ]
    statement = text(
        "SELECT resource_id, payload->>'rule' FROM events WHERE event = :event AND resource_id IN :ids"
    ).bindparams(bindparam("ids", expanding=True))
    for _ in range(60):
        async with connect(passes.database_url) as connection:
            rows = await connection.execute(
                statement, {"event": RECONCILED_EVENT, "ids": [resource for resource, _ in fixed]}
            )
            stored = {(resource, rule) for resource, rule in rows}
        if stored >= set(fixed):
            break
        await asyncio.sleep(0.5)
    assert stored == set(fixed)


async def test_the_report_is_published_under_its_key(passes, module_server):
    with serving(module_server):
        async with prefect_client() as client:
            artifacts = await call(
                client, "POST", "/artifacts/filter", json={"artifacts": {"key": {"any_": [REPORT_KEY]}}}
            )
    assert len(artifacts) >= 3
    texts = [artifact["data"] for artifact in artifacts]
    assert any("dry run: nothing was changed" in data for data in texts)
    assert all("Zombie Running" in data and "Late forever" in data for data in texts)
    # Table cells never wrap in the UI: what was seen is in the list under each table, never a cell.
    real = passes.real.to_markdown()
    table_rows = [line for line in real.splitlines() if line.startswith("|")]
    seen = [action.seen for rule in passes.real.rules for action in rule.runs]
    assert seen and not [text for text in seen if any(text in row for row in table_rows)]
    assert all(
        f"- **{action.run_name}**: {action.seen}" in real
        for rule in passes.real.rules
        for action in rule.runs[:25]
    )


async def test_a_run_that_changes_between_detection_and_action_is_skipped(passes, module_server):
    with serving(module_server):
        run_id = await create_flow_run("race", ["PENDING"])
        await move_back(passes.database_url, [run_id], hours=3)
        parameters = ReconcileParameters(flow_names=("race",))
        rule = RULES_BY_NAME["stuck-pending"]
        scope = await resolve_scope.fn(parameters)
        source = await choose_detection_source.fn()
        findings = await find_stuck_runs.fn(rule, parameters, scope, source, {})
        assert [candidate.run.run_id for candidate in findings.candidates] == [run_id]
        async with prefect_client() as client:
            await call(
                client,
                "POST",
                f"/flow_runs/{run_id}/set_state",
                json={"state": {"type": "RUNNING", "name": "Running"}},
            )
        report = await end_stuck_runs.fn(rule, findings, parameters, scope, budget=10)
    (action,) = report.runs
    assert action.outcome == "skipped" and "changed to Running" in action.reason
    assert (await run_states(passes.database_url))[run_id].state_type == "RUNNING"


async def test_max_actions_caps_a_pass_and_the_next_pass_goes_on(passes, module_server):
    with serving(module_server):
        run_ids = [await create_flow_run("capped", ["PENDING"]) for _ in range(3)]
        await move_back(passes.database_url, run_ids, hours=3)
        first = await reconcile_stuck_runs(max_actions=2, flow_names=["capped"])
        second = await reconcile_stuck_runs(max_actions=2, flow_names=["capped"])
    pending = first.rule("stuck-pending")
    assert (pending.found, pending.fixed, pending.left) == (3, 2, 1)
    assert "left 1 for the next pass" in first.summary()
    assert second.rule("stuck-pending").fixed == 1
    states = await run_states(passes.database_url)
    assert {states[run_id].state_type for run_id in run_ids} == {"CRASHED"}


async def test_max_runtime_crashes_long_runs_only_when_set(passes, module_server):
    with serving(module_server):
        long_run = await create_flow_run("long", ["PENDING", "RUNNING"])
        short_run = await create_flow_run("long", ["PENDING", "RUNNING"])
        await move_back(passes.database_url, [long_run], hours=5)
        off = await reconcile_stuck_runs(flow_names=["long"])
        on = await reconcile_stuck_runs(flow_names=["long"], max_runtime_hours=4)
    assert off.rule("max-runtime").threshold == "off" and off.found == 0
    assert on.rule("max-runtime").ids("fixed") == [long_run]
    states = await run_states(passes.database_url)
    assert states[long_run].state_type == "CRASHED"
    assert "longer than the 4 h limit" in states[long_run].message
    assert states[short_run].state_type == "RUNNING"


async def test_orphan_with_a_fresh_heartbeat_or_a_live_parent_is_left(passes, module_server):
    with serving(module_server):
        parent = await create_flow_run("family", ["PENDING", "RUNNING"])
        async with prefect_client() as client:
            tasks = [
                await call(
                    client,
                    "POST",
                    "/task_runs/",
                    json={"flow_run_id": str(parent), "task_key": "child", "dynamic_key": str(i)},
                )
                for i in range(3)
            ]
        beating, under_live_parent, silent = [
            await create_flow_run("family", ["PENDING", "RUNNING"], parent_task_run_id=task["id"])
            for task in tasks
        ]
        await move_back(passes.database_url, [beating, silent, under_live_parent], hours=2)
        dry_with_live_parent = await reconcile_stuck_runs(dry_run=True, flow_names=["family"])
        async with prefect_client() as client:
            await call(
                client,
                "POST",
                f"/flow_runs/{parent}/set_state",
                json={"state": {"type": "FAILED", "name": "Failed"}, "force": True},
            )
            await call(
                client,
                "POST",
                "/events",
                json=[
                    {
                        "id": str(uuid.uuid4()),
                        "occurred": (datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
                        "event": "prefect.flow-run.heartbeat",
                        "resource": {"prefect.resource.id": f"prefect.flow-run.{beating}"},
                    }
                ],
            )
        await wait_for_event(passes.database_url, beating, HEARTBEAT_EVENT)
        real = await reconcile_stuck_runs(flow_names=["family"])
    assert dry_with_live_parent.rule("orphaned-subflow").found == 0
    assert set(real.rule("orphaned-subflow").ids("fixed")) == {silent, under_live_parent}
    states = await run_states(passes.database_url)
    assert states[beating].state_type == "RUNNING"
    assert "its parent flow run" in states[silent].message and "is Failed" in states[silent].message


async def test_unknown_state_runs_can_be_deleted_through_the_api_but_not_parents(passes, module_server):
    with serving(module_server):
        lone = await create_flow_run("unknown-delete", ["PENDING", "RUNNING", "COMPLETED"])
        parent = await create_flow_run("unknown-delete", ["PENDING", "RUNNING", "COMPLETED"])
        async with prefect_client() as client:
            task = await call(
                client,
                "POST",
                "/task_runs/",
                json={"flow_run_id": str(parent), "task_key": "t", "dynamic_key": "0"},
            )
        child = await create_flow_run(
            "unknown-delete", ["PENDING", "RUNNING", "COMPLETED"], parent_task_run_id=task["id"]
        )
        async with connect(passes.database_url) as connection:
            await connection.execute(
                text("DELETE FROM flow_run_state WHERE flow_run_id IN :ids").bindparams(
                    bindparam("ids", expanding=True)
                ),
                {"ids": [str(lone), str(parent)]},
            )
            await connection.commit()
        report = await reconcile_stuck_runs(unknown_state_action="delete", flow_names=["unknown-delete"])
        async with prefect_client() as client:
            with pytest.raises(PrefectApiError) as missing:
                await call(client, "GET", f"/flow_runs/{lone}")
    unknown = report.rule("unknown-state")
    assert unknown.ids("fixed") == [lone]
    (skipped,) = [action for action in unknown.runs if action.outcome == "skipped"]
    assert skipped.run_id == parent and "subflow" in skipped.reason
    assert missing.value.status_code == 404
    states = await run_states(passes.database_url)
    assert states[parent].state_id is None and states[child].state_type == "COMPLETED"


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("cancelling_after_minutes", 0),
        ("pending_after_minutes", -5),
        ("zombie_after_minutes", 0),
        ("max_runtime_hours", 0),
        ("late_after_hours", -1),
        ("max_actions", 0),
        ("unknown_state_action", "explode"),
        ("deployment_names", ["no-slash"]),
    ],
)
async def test_bad_input_fails_at_once_naming_the_parameter(passes, module_server, parameter, value):
    with serving(module_server):
        before = await run_states(passes.database_url)
        with pytest.raises(Exception, match=parameter):
            await reconcile_stuck_runs(**{parameter: value})
        after = await run_states(passes.database_url)
    assert {run_id: after[run_id] for run_id in before} == before


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        (
            {"deployment_names": ["nowhere/nothing"]},
            "deployment_names: no deployment is named 'nowhere/nothing'",
        ),
        ({"flow_names": ["stuck-etl", "no-such-flow"]}, "flow_names: no flow is named 'no-such-flow'"),
    ],
)
async def test_an_unknown_deployment_or_flow_name_fails_before_anything_is_touched(
    passes, module_server, scope, message
):
    with serving(module_server), pytest.raises(ValueError, match=message):
        await reconcile_stuck_runs(**scope)


@pytest.mark.no_stack
def test_the_report_counts_in_the_singular_and_the_plural():
    report = ReconcileReport(
        dry_run=False,
        detection="sql",
        detection_note="read-only queries",
        started=datetime.now(UTC),
        max_actions=1,
        rules=[
            RuleReport(
                rule="stuck-pending", title="Stuck Pending", finds="-", sets="-", threshold="-", found=1
            )
        ],
    )
    assert report.summary().startswith("found 1 stuck run, fixed 0")
    assert "At most 1 action per pass." in report.to_markdown()
    report.rules[0].found, report.max_actions = 2, 1000
    assert report.summary().startswith("found 2 stuck runs, fixed 0")
    assert "At most 1,000 actions per pass." in report.to_markdown()


@pytest.mark.no_stack
def test_parameters_reject_bad_values_by_name():
    with pytest.raises(ParameterError, match="invalid reconcile parameters: zombie_after_minutes: "):
        ReconcileParameters.parse(zombie_after_minutes=-1)
    assert ReconcileParameters(late_after_hours=2).threshold("late_after_hours") == timedelta(hours=2)


async def test_a_chain_of_orphaned_subflows_ends_in_one_pass(passes, module_server):
    """Parent cancelled -> child Running -> grandchild Running, both silent: the child is
    orphaned first, which orphans the grandchild; one pass ends both, the dry run says so,
    and a second pass finds nothing."""
    with serving(module_server):
        parent = await create_flow_run("chain", ["PENDING", "RUNNING"])
        async with prefect_client() as client:
            holder = await call(
                client,
                "POST",
                "/task_runs/",
                json={"flow_run_id": str(parent), "task_key": "child", "dynamic_key": "0"},
            )
            child = await create_flow_run("chain", ["PENDING", "RUNNING"], parent_task_run_id=holder["id"])
            holder = await call(
                client,
                "POST",
                "/task_runs/",
                json={"flow_run_id": str(child), "task_key": "grandchild", "dynamic_key": "0"},
            )
            grandchild = await create_flow_run(
                "chain", ["PENDING", "RUNNING"], parent_task_run_id=holder["id"]
            )
            for state in ("CANCELLING", "CANCELLED"):
                await call(
                    client,
                    "POST",
                    f"/flow_runs/{parent}/set_state",
                    json={"state": {"type": state, "name": state.title()}, "force": True},
                )
        await move_back(passes.database_url, [parent, child, grandchild], hours=2)
        dry = await reconcile_stuck_runs(dry_run=True, flow_names=["chain"])
        real = await reconcile_stuck_runs(flow_names=["chain"])
        second = await reconcile_stuck_runs(flow_names=["chain"])
    assert set(dry.rule("orphaned-subflow").ids("would fix")) == {child, grandchild}
    assert set(real.rule("orphaned-subflow").ids("fixed")) == {child, grandchild}
    assert second.found == 0
    states = await run_states(passes.database_url)
    assert states[child].state_type == states[grandchild].state_type == "CANCELLED"
