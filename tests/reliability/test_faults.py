"""Faults at 3 a.m.: what retention and reconcile do when the world breaks under them.

Each test breaks one thing on purpose, on a Prefect server and database of this module's
own (the server is killed and restarted here): a database session terminated inside a
batch, rows locked by someone else, two purges at once, user traffic during a purge, the
Prefect server dying during an API purge and during a reconcile pass. After each: nothing
that was not finished is gone, nothing is half-deleted, and the next run finishes the job.
"""

from __future__ import annotations

import asyncio
import statistics
import uuid
from time import perf_counter

import pytest
import sqlalchemy as sa
from history import (
    QUICK,
    PlannedRun,
    create_history,
    dangling_collections,
    existing,
    old_finished_runs,
    owned_rows,
    rows,
    session_waiting_for_a_lock,
    terminate_waiting_maintenance_session,
    wait_for,
    waiting_maintenance_session,
)
from sqlalchemy.ext.asyncio import create_async_engine

from flows.reconcile import reconcile_stuck_runs
from flows.retention import RetentionFailed, retention
from localstack.orphans import count_orphans
from tasks.prefect_api import PrefectApiError, call, prefect_client
from tasks.retention.policy import GONE_OR_BUSY
from tasks.retention.report import REPORT_KEY
from tasks.retention.sql_engine import ADVISORY_LOCK_KEY, RetentionAlreadyRunning
from tasks.settings import get_settings

# Bounds of the user traffic sent during a purge: it stops by itself.
LOAD_WORKERS = 3
LOAD_MAX_RUNS = 600
LOAD_MAX_SECONDS = 30.0


@pytest.fixture
async def database(module_server):
    """Two sessions of the test's own on the fault server's database: one holds locks, one watches."""
    engine = create_async_engine(module_server.database_url)
    try:
        async with engine.connect() as holder, engine.connect() as watcher:
            # pg_stat_activity and pg_locks are read once per transaction: watch from outside any.
            await watcher.execution_options(isolation_level="AUTOCOMMIT")
            yield holder, watcher
    finally:
        await engine.dispose()


def lock_timeout(monkeypatch, seconds: float) -> None:
    monkeypatch.setenv("MAINTENANCE_LOCK_TIMEOUT_SECONDS", str(seconds))
    get_settings(refresh=True)


async def test_a_batch_whose_session_is_terminated_mid_way_rolls_back_and_the_retry_finishes(
    on_module_server, database, monkeypatch
):
    holder, watcher = database
    history = await old_finished_runs("terminated", 6)
    ids = history.ids
    first, second, last = history.in_batches(2)
    before = await owned_rows(last)
    # The last batch's transaction deletes its runs' logs, then waits on this lock (on the
    # artifact of its newest run) before deleting their artifacts.
    lock_timeout(monkeypatch, 120)
    await holder.execute(
        sa.text("SELECT id FROM artifact WHERE flow_run_id = :id FOR UPDATE"), {"id": last[-1]}
    )
    purge = asyncio.create_task(retention(engine="sql", flow_names=history.flow_names, batch_size=2, **QUICK))
    terminated: set[int] = set()
    for attempt in (1, 2):
        assert await terminate_waiting_maintenance_session(watcher, terminated)
        # The next attempt waits on the same lock: what the terminated one did is undone.
        await waiting_maintenance_session(watcher, terminated, what=f"retry {attempt} of the batch")
        assert await existing(ids) == set(last), "the first two batches committed, the third is whole"
        assert await owned_rows(last) == before, "the terminated batch was rolled back whole"
        assert await owned_rows(first + second) == dict.fromkeys(before, 0)
    await holder.rollback()
    report = await purge
    assert (report.flow_runs_deleted, report.stopped_reason) == (6, "finished")
    assert not await existing(ids)
    assert await owned_rows(ids) == dict.fromkeys(before, 0)
    assert await dangling_collections(["terminated-report"]) == 0


async def test_a_batch_that_fails_every_retry_stops_the_flow_cleanly_and_the_next_run_finishes(
    on_module_server, module_server, database, monkeypatch
):
    holder, watcher = database
    history = await old_finished_runs("terminated-thrice", 4)
    ids = history.ids
    first, last = history.in_batches(2)
    before = await owned_rows(last)
    lock_timeout(monkeypatch, 120)
    await holder.execute(
        sa.text("SELECT id FROM artifact WHERE flow_run_id = :id FOR UPDATE"), {"id": last[-1]}
    )
    purge = asyncio.create_task(
        retention(engine="sql", flow_names=history.flow_names, batch_size=2, **QUICK, return_state=True)
    )
    terminated: set[int] = set()
    for _ in range(3):  # the first attempt and both retries
        assert await terminate_waiting_maintenance_session(watcher, terminated)
    state = await purge
    await holder.rollback()
    assert state.is_failed()
    with pytest.raises(RetentionFailed, match="retention stopped after 2 flow runs") as failure:
        await state.result()
    assert module_server.database_url not in str(failure.value)
    assert await existing(ids) == set(last) and await owned_rows(last) == before
    # The report of the failed run is not lost: it says what was done and why it stopped.
    async with prefect_client() as client:
        artifacts = await call(
            client,
            "POST",
            "/artifacts/filter",
            json={
                "artifacts": {
                    "key": {"any_": [REPORT_KEY]},
                    "flow_run_id": {"any_": [str(state.state_details.flow_run_id)]},
                }
            },
        )
    markdown = next(artifact["data"] for artifact in artifacts if artifact["type"] == "markdown")
    assert "Stopped by an error" in markdown

    report = await retention(engine="sql", flow_names=history.flow_names, **QUICK)
    assert report.flow_runs_deleted == 2 and not await existing(ids)
    assert await owned_rows(ids) == dict.fromkeys(before, 0)


async def test_rows_locked_by_another_transaction_are_passed_by_and_reported(
    on_module_server, database, monkeypatch
):
    holder, _ = database
    lock_timeout(monkeypatch, 0.5)
    history = await create_history(
        "locked",
        [
            PlannedRun("COMPLETED", 90, name="locked row"),
            PlannedRun("FAILED", 90, name="tree"),
            PlannedRun("COMPLETED", 90, parent=1, name="locked subflow"),
            # One of its log rows is locked: lock_timeout.
            PlannedRun("COMPLETED", 90, name="locked log"),
            PlannedRun("COMPLETED", 90, name="free"),
        ],
    )
    ids, run = history.ids, history.named
    await holder.execute(
        sa.text("SELECT id FROM flow_run WHERE id = ANY(:ids) FOR UPDATE"),
        {"ids": [run["locked row"], run["locked subflow"]]},
    )
    await holder.execute(
        sa.text("SELECT id FROM log WHERE flow_run_id = :id LIMIT 1 FOR UPDATE"), {"id": run["locked log"]}
    )
    report = await retention(engine="sql", flow_names=history.flow_names, batch_size=1, **QUICK)
    assert report.flow_runs_deleted == 1 and report.stopped_reason == "finished"
    assert report.left == {GONE_OR_BUSY: 2, "locked: lock_timeout reached": 1}
    markdown = report.to_markdown()
    assert GONE_OR_BUSY in markdown and "lock_timeout" in markdown
    assert await existing(ids) == set(ids) - {run["free"]}
    assert await owned_rows([run["locked log"]]) == {
        "flow_run_state": 1,
        "task_run": 0,
        "log": 2,
        "artifact": 0,
    }
    await holder.rollback()

    again = await retention(engine="sql", flow_names=history.flow_names, batch_size=1, **QUICK)
    assert again.flow_runs_deleted == 4 and again.left == {}
    assert not await existing(ids)


async def test_two_retention_runs_at_once_never_delete_twice(on_module_server, database):
    _, watcher = database
    history = await old_finished_runs("concurrent", 16, artifacts=False)
    scope = {**QUICK, "engine": "sql", "flow_names": history.flow_names, "batch_size": 1}
    # Paced so that it is still deleting when the second one starts.
    first = asyncio.create_task(retention(**{**scope, "max_runs_per_second": 4}, return_state=True))
    high, low = (ADVISORY_LOCK_KEY >> 32) & 0xFFFFFFFF, ADVISORY_LOCK_KEY & 0xFFFFFFFF

    async def purge_lock_held():
        held = await watcher.execute(
            sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND classid::bigint = :high AND objid::bigint = :low"
            ),
            {"high": high, "low": low},
        )
        return held.scalar()

    await wait_for(purge_lock_held, what="the first purge's advisory lock")
    second = await retention(**scope, return_state=True)
    assert second.is_failed()
    with pytest.raises(RetentionAlreadyRunning, match="nothing was deleted"):
        await second.result()
    report = await (await first).result()
    assert report.flow_runs_deleted == 16 == len(history.ids)
    assert not await existing(history.ids)


async def test_runs_created_and_finishing_under_load_during_a_purge_are_never_deleted(
    on_module_server, capsys
):
    history = await old_finished_runs("under-load", 120, artifacts=False)
    latencies: list[float] = []
    created: list[uuid.UUID] = []
    revived: list[uuid.UUID] = []
    # Every finished run older than about an hour on this server is a candidate.
    purge = asyncio.create_task(
        retention(engine="sql", older_than_days=0.05, batch_size=10, **{**QUICK, "max_runs_per_second": 40})
    )
    started = perf_counter()

    def going_on() -> bool:
        return (
            not purge.done() and len(created) < LOAD_MAX_RUNS and perf_counter() - started < LOAD_MAX_SECONDS
        )

    async with prefect_client() as client:
        flow_id = str(await client.create_flow_from_name("under-load-traffic"))

        async def timed(method: str, path: str, json: dict) -> dict:
            sent = perf_counter()
            answer = await call(client, method, path, json=json)
            latencies.append(perf_counter() - sent)
            return answer

        async def user_runs() -> None:
            while going_on():
                run = await timed(
                    "POST",
                    "/flow_runs/",
                    {"flow_id": flow_id, "state": {"type": "PENDING", "name": "Pending"}},
                )
                created.append(uuid.UUID(run["id"]))
                for state in ("RUNNING", "COMPLETED"):
                    await timed(
                        "POST",
                        f"/flow_runs/{run['id']}/set_state",
                        {"state": {"type": state, "name": state.title()}},
                    )

        async def retries_from_the_ui() -> None:
            # Someone retries old runs while they are being purged, the newest (purged last) first.
            for run_id in reversed(history.ids):
                if not going_on():
                    return
                try:
                    await timed(
                        "POST",
                        f"/flow_runs/{run_id}/set_state",
                        {"state": {"type": "RUNNING", "name": "Running"}, "force": True},
                    )
                    revived.append(run_id)
                except PrefectApiError as error:
                    assert error.status_code == 404, error
                await asyncio.sleep(0.05)

        await asyncio.gather(*(user_runs() for _ in range(LOAD_WORKERS)), retries_from_the_ui())
        report = await purge
        load_seconds = perf_counter() - started

    assert revived, "some old runs were retried before the purge reached them"
    assert await existing(created) == set(created), "no run of the traffic was deleted"
    assert await existing(history.ids) == set(revived), "every old run went, except those retried in time"
    states = await rows(
        "SELECT DISTINCT CAST(state_type AS text) FROM flow_run WHERE id IN :ids", ids=revived
    )
    assert [row[0] for row in states] == ["RUNNING"]
    assert report.flow_runs_deleted >= len(history.ids) - len(revived)
    p50, p99 = (statistics.quantiles(latencies, n=100)[index] for index in (49, 98))
    with capsys.disabled():
        print(
            f"\n[load during purge] {len(created)} runs created and finished ({len(created) / load_seconds:.0f} runs/s, "
            f"{len(latencies)} API calls): p50 {1000 * p50:.0f} ms, p99 {1000 * p99:.0f} ms; "
            f"purge deleted {report.flow_runs_deleted} runs in {report.seconds:.1f} s, {len(revived)} retried runs kept"
        )


async def restart_while_the_server_waits_on(server, holder, watcher) -> None:
    """Kill the server while one of its requests waits on the held lock, then start it again."""
    await wait_for(lambda: session_waiting_for_a_lock(watcher), what="the server waiting on the held lock")
    await asyncio.to_thread(server.stop, 1)
    # The killed server's transaction rolls back once it gets the lock and finds its client gone.
    await holder.rollback()
    await asyncio.to_thread(server.start)


async def outcome_of(flow_call) -> str:
    """'completed' or 'failed': either is acceptable in a fault, as long as the failure is clean."""
    try:
        state = await flow_call
    except Exception as error:  # the engine may lose the server while reporting the failure
        message = str(error)
    else:
        if state.is_completed():
            return "completed"
        message = str(state.message)
    assert "postgresql+asyncpg://" not in message, "no database URL in a failure"
    return "failed"


async def test_a_server_restart_during_an_api_purge_is_finished_by_a_rerun_and_the_orphan_sweep(
    on_module_server, module_server, database, capsys
):
    holder, watcher = database
    history = await old_finished_runs("restart-purge", 150)
    scope = {**QUICK, "flow_names": history.flow_names}
    # The API engine deletes in id order: the largest id is in its last batch.
    await holder.execute(
        sa.text("SELECT id FROM flow_run WHERE id = :id FOR UPDATE"), {"id": max(history.ids)}
    )
    purge = asyncio.create_task(
        outcome_of(retention(engine="api", batch_size=25, **scope, return_state=True))
    )
    await restart_while_the_server_waits_on(module_server, holder, watcher)
    first = await purge

    rerun = await retention(engine="api", **scope)
    assert rerun.stopped_reason == "finished"
    assert not await existing(history.ids)
    left_behind = await count_orphans()
    sweep = await retention(engine="sql", include_orphans=True, **scope)
    assert await count_orphans() == dict.fromkeys(left_behind, 0)
    assert await owned_rows(history.ids) == {"flow_run_state": 0, "task_run": 0, "log": 0, "artifact": 0}
    assert await dangling_collections(["restart-purge-report"]) == 0
    with capsys.disabled():
        print(
            f"\n[server restart during an API purge] first run {first}; the re-run deleted "
            f"{rerun.flow_runs_deleted} runs; orphans left by the restart {left_behind}, swept {sweep.orphan_rows_deleted}"
        )


async def test_a_server_restart_during_a_reconcile_pass_is_finished_by_the_next_pass(
    on_module_server, module_server, database
):
    holder, watcher = database
    history = await create_history("restart-reconcile", [PlannedRun("PENDING", 0.1) for _ in range(40)])
    scope = {"flow_names": history.flow_names}
    # The pass waits on this run half-way through.
    midway = history.ids[len(history.ids) // 2]
    await holder.execute(sa.text("SELECT id FROM flow_run WHERE id = :id FOR UPDATE"), {"id": midway})
    first = asyncio.create_task(outcome_of(reconcile_stuck_runs(**scope, return_state=True)))
    await restart_while_the_server_waits_on(module_server, holder, watcher)
    await first

    await reconcile_stuck_runs(**scope)
    states = await rows(
        "SELECT CAST(state_type AS text) AS type, count(*) FROM flow_run WHERE id IN :ids GROUP BY 1",
        ids=history.ids,
    )
    assert {row.type: row.count for row in states} == {"CRASHED": 40}
    assert (await reconcile_stuck_runs(**scope)).found == 0
