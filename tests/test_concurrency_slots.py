"""Deployment concurrency slots after lost nodes and server restarts, on real Prefect servers
with a real process worker.

The story: a job that must never run twice at once (`concurrency_limit=1`) loses its node
(worker and flow process killed); the server takes its slot back when the lease expires,
the next run starts on another node, the server restarts, and the reconcile pass ends the
dead run, which makes the server free a slot a second time. One pass later the limit holds
exactly its live run, the run after it waits for it, and no two runs ever overlap. Next to
it: slots leaked by deleted runs, a live run never touched, a limit already over-admitted,
an exact dry run, and runs starting and finishing while the pass corrects their limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path
from uuid import UUID

import pytest
from conftest import serving, use_server
from history import wait_for
from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions
from prefect.client.schemas.responses import SetStateStatus
from prefect.states import Completed, Pending, Running
from workers import stop_worker, wait_until_final

from deploy import PROJECT_ROOT
from flows.db_health import db_health_report
from flows.reconcile import reconcile_stuck_runs
from tasks.database import connect
from tasks.prefect_api import HEARTBEAT_EVENT, call, prefect_client
from tasks.reconcile.concurrency import CORRECTED_EVENT, read_deployment_slots
from tasks.reconcile.detect import choose_detection_source, resolve_scope
from tasks.reconcile.parameters import ReconcileParameters
from tasks.reconcile.passes import ReconcilePass, walk_rules

POOL = "user-jobs"
ENTRYPOINT = "tests/flows/hold_slot.py:hold_slot"
# The repossessor looks for expired leases every second instead of every 15.
FAST_REPOSSESSOR = {"PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1"}
# The shortest lease the API accepts; the engine renews its own for 300 s.
SHORTEST_LEASE_SECONDS = 60
WAIT_SECONDS = 240


async def create_deployment(name: str, limit: int = 1) -> UUID:
    async with prefect_client() as client:
        with contextlib.suppress(Exception):
            await call(client, "POST", "/work_pools/", json={"name": POOL, "type": "process"})
        flow_id = await client.create_flow_from_name("hold-slot")
        return await client.create_deployment(
            flow_id=flow_id,
            name=name,
            work_pool_name=POOL,
            entrypoint=ENTRYPOINT,
            pull_steps=[
                {"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT_ROOT)}}
            ],
            concurrency_limit=limit,
            concurrency_options=ConcurrencyOptions(collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        )


async def run_deployment(deployment_id: UUID, seconds: float) -> UUID:
    async with prefect_client() as client:
        run = await client.create_flow_run_from_deployment(deployment_id, parameters={"seconds": seconds})
    return run.id


async def active_slots(deployment_id: UUID) -> int:
    async with prefect_client() as client:
        limit = await call(client, "GET", f"/v2/concurrency_limits/deployment:{deployment_id}")
    return limit["active_slots"]


async def by_hand(route: str, deployment_id: UUID) -> None:
    """One slot of the deployment's limit taken (`increment`) or freed (`decrement`) by hand,
    the way a lost lease or a dead client leaves it."""
    async with prefect_client() as client:
        await call(
            client,
            "POST",
            f"/v2/concurrency_limits/{route}",
            json={"names": [f"deployment:{deployment_id}"], "slots": 1},
        )


async def state_of(run_id: UUID):
    async with prefect_client() as client:
        return (await client.read_flow_run(run_id)).state


async def has_sent_a_heartbeat(run_id: UUID) -> bool:
    async with prefect_client() as client:
        events = await call(
            client,
            "POST",
            "/events/filter",
            json={
                "filter": {
                    "event": {"name": [HEARTBEAT_EVENT]},
                    "resource": {"id": [f"prefect.flow-run.{run_id}"]},
                }
            },
        )
    return bool(events["events"])


async def running(run_id: UUID) -> bool:
    state = await state_of(run_id)
    return state is not None and state.type.value == "RUNNING"


def start_node(server, log_path: Path) -> subprocess.Popen:
    """A process worker of the user's pool: a node; its flow processes share its process group."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [
                str(PROJECT_ROOT / ".venv" / "bin" / "prefect"),
                "worker",
                "start",
                "--pool",
                POOL,
                "--type",
                "process",
            ],
            cwd=PROJECT_ROOT,
            env={
                **os.environ,
                "PREFECT_API_URL": server.api_url,
                "PREFECT_WORKER_QUERY_SECONDS": "1",
                "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def lose_node(node: subprocess.Popen, run_id: UUID) -> None:
    """The node is gone: kill -9 for the worker and for the run's flow process (the worker
    starts each flow process in a session of its own)."""
    os.killpg(node.pid, signal.SIGKILL)
    node.wait(timeout=10)
    marker = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if marker in environ.read_bytes().split(b"\0"):
                os.kill(int(environ.parent.name), signal.SIGKILL)


async def test_a_lost_node_and_a_restart_leave_the_limit_holding_its_live_run(fresh_server, tmp_path):
    server = fresh_server(extra_env=FAST_REPOSSESSOR)
    with serving(server):
        deployment = await create_deployment("nightly-export")
        lost = await run_deployment(deployment, seconds=600)
        node = start_node(server, tmp_path / "node-1.log")
        try:
            await wait_for(
                lambda: running(lost), what="the first run to start", timeout=WAIT_SECONDS, pause=1
            )
            # The zombie rule judges runs by their last heartbeat: let it send one.
            await wait_for(
                lambda: has_sent_a_heartbeat(lost), what="its first heartbeat", timeout=90, pause=1
            )
        finally:
            lose_node(node, lost)
        assert await active_slots(deployment) == 1
        # Its lease would live 300 s more (the engine renews for 300 s): shorten it, as if
        # those five minutes had passed, and let the repossessor take the slot back.
        lease = (await state_of(lost)).state_details.deployment_concurrency_lease_id
        async with prefect_client() as client:
            await call(
                client,
                "POST",
                f"/v2/concurrency_limits/leases/{lease}/renew",
                json={"lease_duration": SHORTEST_LEASE_SECONDS},
            )
        await wait_for(
            lambda: _is_zero(active_slots(deployment)), what="the repossessor", timeout=120, pause=1
        )
        assert (await state_of(lost)).type.value == "RUNNING"

        second_node = start_node(server, tmp_path / "node-2.log")
        try:
            live = await run_deployment(deployment, seconds=75)
            await wait_for(
                lambda: running(live), what="the second run to start", timeout=WAIT_SECONDS, pause=1
            )
            server.stop()
            server.start()
            report = await reconcile_stuck_runs(dry_run=False, zombie_after_minutes=1)
            assert report.rule("zombie").ids("fixed") == [lost]
            # Before the zombie rule ends the dead run, the limit counts both holders again,
            # so that the slot the server frees when it ends is the dead run's own.
            slots = report.rule("concurrency-slots")
            assert [(limit.slots_before, limit.slots_after) for limit in slots.limits] == [(1, 2)]
            assert {holder.run_id for holder in slots.limits[0].holders} == {lost, live}
            assert await active_slots(deployment) == 1

            following = await run_deployment(deployment, seconds=1)
            runs = await wait_until_final([live, following])
        finally:
            stop_worker(second_node)
        log = (tmp_path / "node-2.log").read_text(errors="replace")[-3000:]
        assert {run_id: run.state.type.value for run_id, run in runs.items()} == {
            live: "COMPLETED",
            following: "COMPLETED",
        }, log
        assert runs[live].end_time <= runs[following].start_time, "two runs of the deployment ran at once"
        assert await active_slots(deployment) == 0
        again = await reconcile_stuck_runs(dry_run=True)
        assert again.rule("concurrency-slots").found == 0


async def _is_zero(count) -> bool:
    return await count == 0


async def take_slot(run_id: UUID) -> bool:
    async with prefect_client() as client:
        result = await client.set_flow_run_state(run_id, Pending())
    return result.status == SetStateStatus.ACCEPT


async def set_state(run_id: UUID, state) -> None:
    async with prefect_client() as client:
        result = await client.set_flow_run_state(run_id, state)
    assert result.status == SetStateStatus.ACCEPT, result


@pytest.mark.parametrize(
    ("version", "with_database"), [("3.1.15", True), ("3.6.29", True), (None, True), (None, False)]
)
async def test_a_slot_no_run_holds_is_freed_on_every_supported_server(fresh_server, version, with_database):
    # A slot counted with no run holding it (here taken by hand with /increment, as a
    # script or a client that died between taking and recording it leaves one): every
    # later run of the deployment waits for ever.
    server = fresh_server(version=version)
    with use_server(server.api_url, server.database_url if with_database else None):
        leaked = await create_deployment("leaked")
        await by_hand("increment", leaked)
        waiting = await run_deployment(leaked, seconds=1)
        assert not await take_slot(waiting)
        dry = await reconcile_stuck_runs(dry_run=True)
        assert dry.detection == ("sql" if with_database else "api")
        expected = [("hold-slot/leaked", 1, 0, "decrement 1", [])]
        assert slot_changes(dry) == expected
        assert await active_slots(leaked) == 1
        real = await reconcile_stuck_runs(dry_run=False)
        assert slot_changes(real) == expected
        assert await active_slots(leaked) == 0
        assert await take_slot(waiting)
        assert slot_changes(await reconcile_stuck_runs(dry_run=True)) == []


def slot_changes(report) -> list[tuple]:
    return [
        (
            limit.deployment_name,
            limit.slots_before,
            limit.slots_after,
            limit.change,
            sorted(holder.run_id for holder in limit.holders),
        )
        for limit in report.rule("concurrency-slots").limits
    ]


async def test_shortfalls_are_restored_and_live_runs_untouched(on_fresh_server):
    # A healthy deployment with a live run.
    healthy = await create_deployment("healthy")
    live = await run_deployment(healthy, seconds=1)
    assert await take_slot(live)
    await set_state(live, Running())
    live_state = await state_of(live)
    # A deployment whose live run lost its slot (freed twice).
    short = await create_deployment("freed-twice")
    holder = await run_deployment(short, seconds=1)
    assert await take_slot(holder)
    await set_state(holder, Running())
    await by_hand("decrement", short)
    # A limit of 1 already over-admitted: two runs hold it, one slot is counted.
    over = await create_deployment("over-admitted")
    first, second = await run_deployment(over, 1), await run_deployment(over, 1)
    assert await take_slot(first)
    await by_hand("decrement", over)
    assert await take_slot(second)
    expected = [
        ("hold-slot/freed-twice", 0, 1, "increment 1", [holder]),
        ("hold-slot/over-admitted", 1, 2, "set to 2 (over-admitted)", sorted([first, second])),
    ]
    dry = await reconcile_stuck_runs(dry_run=True)
    assert slot_changes(dry) == expected
    assert [await active_slots(d) for d in (healthy, short, over)] == [1, 0, 1]
    real = await reconcile_stuck_runs(dry_run=False)
    assert slot_changes(real) == expected
    assert {limit.outcome for limit in real.rule("concurrency-slots").limits} == {"fixed"}
    assert [await active_slots(d) for d in (healthy, short, over)] == [1, 1, 2]
    after = await state_of(live)
    assert (after.id, after.state_details.deployment_concurrency_lease_id) == (
        live_state.id,
        live_state.state_details.deployment_concurrency_lease_id,
    )
    assert await wait_for(lambda: corrected_limits(), what="the events", timeout=WAIT_SECONDS, pause=1) == {
        f"deployment:{deployment}" for deployment in (short, over)
    }
    assert (await reconcile_stuck_runs(dry_run=True)).rule("concurrency-slots").found == 0
    # The over-admitted limit lets a new run in only once both have finished.
    third = await run_deployment(over, 1)
    await set_state(first, Running())
    await set_state(first, Completed())
    assert not await take_slot(third)
    await set_state(second, Running())
    await set_state(second, Completed())
    assert await take_slot(third)


async def test_ending_a_dead_run_whose_slot_was_taken_back_admits_no_second_run(on_fresh_server):
    # The dead run's slot was taken back (its lease expired) and a live run holds the only
    # slot. Ending the dead run makes the server free a slot again: the limit is corrected
    # before the rules that end runs, so at no moment of the pass can a waiting run start.
    deployment = await create_deployment("freed-twice-in-the-pass")
    dead = await run_deployment(deployment, seconds=1)
    assert await take_slot(dead)  # Pending, and never heard of again
    await by_hand("decrement", deployment)
    live = await run_deployment(deployment, seconds=1)
    assert await take_slot(live)
    await set_state(live, Running())
    waiting = await run_deployment(deployment, seconds=1)
    await asyncio.sleep(2)
    parameters = ReconcileParameters(pending_after_minutes=1 / 60)
    seen_after_each_rule: dict[str, tuple[int, bool]] = {}

    async def after_each_rule(rule, report, done) -> None:
        if rule.name == "stuck-pending":
            assert report.ids("fixed") == [dead]
        seen_after_each_rule[rule.name] = (
            await active_slots(deployment),
            (await state_of(waiting)).is_pending(),
        )

    source = await choose_detection_source.fn()
    scope = await resolve_scope.fn(parameters)
    reports = await walk_rules(ReconcilePass(parameters, scope, source, as_tasks=False), after_each_rule)
    # Corrected to its two holders before the dead run ends, back to the live run's one
    # after; at no moment below it, and the waiting run never got in.
    assert seen_after_each_rule["poison-pill"] == (1, False)
    assert seen_after_each_rule["unknown-state"] == (2, False)
    assert seen_after_each_rule["stuck-pending"] == (1, False)
    assert set(seen_after_each_rule.values()) <= {(1, False), (2, False)}, seen_after_each_rule
    slots = next(report for report in reports if report.rule == "concurrency-slots")
    assert [(limit.slots_before, limit.slots_after) for limit in slots.limits] == [(1, 2)]
    assert not await take_slot(waiting)
    await set_state(live, Completed())
    assert await take_slot(waiting)


async def corrected_limits() -> set[str]:
    async with prefect_client() as client:
        events = await call(
            client, "POST", "/events/filter", json={"filter": {"event": {"name": [CORRECTED_EVENT]}}}
        )
    return {event["resource"]["prefect.resource.name"] for event in events["events"]}


async def holding(database_url: str) -> dict[UUID, tuple[int, int]]:
    """Per deployment limit: (active slots, holders), in one snapshot."""
    async with connect(database_url, read_only=True) as connection:
        return {
            slots.deployment_id: (slots.active_slots, len(slots.holders))
            for slots in await read_deployment_slots(connection)
        }


async def test_runs_starting_and_finishing_during_the_pass_are_never_over_admitted_nor_blocked(
    on_fresh_server,
):
    limit = 2
    deployment = await create_deployment("busy", limit=limit)
    stop = asyncio.Event()
    admitted = 0
    most_at_once = 0

    async def lifecycles() -> None:
        # One user's runs, one after another: take a slot, run, finish.
        nonlocal admitted, most_at_once
        while not stop.is_set():
            run_id = await run_deployment(deployment, 0)
            if not await take_slot(run_id):
                await asyncio.sleep(0.05)
                continue
            admitted += 1
            _, holders = (await holding(on_fresh_server.database_url))[deployment]
            most_at_once = max(most_at_once, holders)
            await set_state(run_id, Running())
            await set_state(run_id, Completed())

    users = [asyncio.create_task(lifecycles()) for _ in range(limit)]
    try:
        for _ in range(6):
            # A slot leaks (a deleted holder), then a pass frees it while the runs go on.
            async with prefect_client() as client:
                await call(
                    client,
                    "PATCH",
                    f"/v2/concurrency_limits/deployment:{deployment}",
                    json={"active_slots": limit},
                )
            report = await reconcile_stuck_runs(dry_run=False, deployment_names=["hold-slot/busy"])
            for correction in report.rule("concurrency-slots").limits:
                assert correction.outcome in ("fixed", "skipped"), correction
    finally:
        stop.set()
        await asyncio.gather(*users)
    assert most_at_once <= limit
    assert admitted > 6
    # Nothing holds it now: every slot is free, none leaked, none missing.
    assert (await holding(on_fresh_server.database_url))[deployment] == (0, 0)


async def test_the_health_report_lists_every_limit_and_flags_slots_no_live_run_holds(on_fresh_server):
    leaked = await create_deployment("leaked")
    async with prefect_client() as client:
        await call(client, "POST", "/v2/concurrency_limits/", json={"name": "db", "limit": 3})
        await call(client, "POST", "/v2/concurrency_limits/", json={"name": "api", "limit": 2})
        for name in (f"deployment:{leaked}", "db"):
            await call(client, "POST", "/v2/concurrency_limits/increment", json={"names": [name], "slots": 1})
    report = await db_health_report(thresholds={"leaked_slot_minutes": 0})
    listed = {row["object"]: row for row in report.findings["concurrency_slots"]}
    assert set(listed) == {f"deployment:{leaked} (hold-slot/leaked)", "db", "api"}
    assert (listed["db"]["active_slots"], listed["api"]["active_slots"]) == (1, 0)
    flags = {flag.object: flag for flag in report.flags if flag.check == "concurrency_slots"}
    assert set(flags) == {f"deployment:{leaked} (hold-slot/leaked)", "db"}
    assert "rule concurrency-slots frees them" in flags[f"deployment:{leaked} (hold-slot/leaked)"].advice
    assert '/api/v2/concurrency_limits/decrement with {"names": ["db"], "slots": 1}' in flags["db"].advice
    assert "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE" in flags["db"].advice

    # A live run whose slot was freed twice: flagged at once; the global slot may be its.
    short = await create_deployment("freed-twice")
    holder = await run_deployment(short, seconds=1)
    assert await take_slot(holder)
    await set_state(holder, Running())
    await by_hand("decrement", short)
    report = await db_health_report()
    flags = {flag.object: flag for flag in report.flags if flag.check == "concurrency_slots"}
    assert set(flags) == {f"deployment:{short} (hold-slot/freed-twice)"}
    assert flags[f"deployment:{short} (hold-slot/freed-twice)"].value == 1
    assert "admits 1 run beyond its limit of 1" in flags[f"deployment:{short} (hold-slot/freed-twice)"].advice
