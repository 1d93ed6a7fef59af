"""The API engine on older Prefect servers, each a real server of that version.

Before 3.6.16 there is no `bulk_delete`, whose filter checked that a run is still finished:
`DELETE /flow_runs/{id}` deletes a run in any state. Before 3.4.9 the server never deletes
the logs of the runs it deletes. And no server deletes task run cache rows: with a
database configured the engine deletes them (and those logs) itself; without one the
report says what stays. Each time the dry run says beforehand what the real run then does.
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from conftest import serving, use_server
from history import QUICK, PlannedRun, create_history, existing, scalar, session_waiting_for_a_lock, wait_for
from prefect.client.schemas.objects import StateType
from prefect.states import Running
from sqlalchemy.ext.asyncio import create_async_engine

from flows.retention import retention
from localstack.orphans import count_orphans
from localstack.seed import seed_messy_history
from tasks.prefect_api import prefect_client
from tasks.retention import api_logs
from tasks.retention.policy import CHANGED


async def test_without_bulk_delete_a_run_that_leaves_its_terminal_state_before_its_delete_stays(
    fresh_server,
):
    server = fresh_server(version="3.4.25")
    with serving(server):
        # A tree (an old run and its subflow) and another old run.
        history = await create_history(
            "retried-meanwhile",
            [PlannedRun("COMPLETED", 90), PlannedRun("COMPLETED", 0, parent=0), PlannedRun("COMPLETED", 90)],
        )
        tree_root, subflow, retried = history.ids
        holder_engine = create_async_engine(server.database_url)
        try:
            async with holder_engine.connect() as holder, holder_engine.connect() as watcher:
                await watcher.execution_options(isolation_level="AUTOCOMMIT")
                # The subflows go first: holding the subflow's row keeps the engine between
                # judging the batch and deleting its top-level runs.
                await holder.execute(
                    sa.text("SELECT id FROM flow_run WHERE id = :id FOR UPDATE"), {"id": subflow}
                )
                purge = asyncio.create_task(
                    retention(engine="api", flow_names=history.flow_names[:1], **QUICK)
                )
                await wait_for(
                    lambda: session_waiting_for_a_lock(watcher),
                    what="the server waiting for the held lock",
                    timeout=60,
                )
                # Meanwhile someone retries the other run from the UI.
                async with prefect_client() as client:
                    await client.set_flow_run_state(retried, Running(), force=True)
                await holder.rollback()
                report = await purge
        finally:
            await holder_engine.dispose()
        assert await existing([tree_root, subflow, retried]) == {retried}
        assert report.flow_runs_deleted == 2 and report.left == {CHANGED: 1}
        async with prefect_client() as client:
            assert (await client.read_flow_run(retried)).state.type == StateType.RUNNING


async def test_on_prefect_3_1_the_api_engine_says_which_logs_stay_and_waits_for_none(fresh_server):
    server = fresh_server(version="3.1.15")
    with serving(server):
        history = await seed_messy_history(server.database_url, prefix="old", poison_pill=False)
        expected = history.expired_by_default()
        logs_of_expected = "SELECT count(*) FROM log WHERE flow_run_id IN :ids"
        logs = await scalar(logs_of_expected, ids=list(expected))
        assert logs > 0
        with use_server(server.api_url, None):  # the API alone, as on Prefect Cloud
            dry = await retention(dry_run=True, engine="api", **QUICK)
            report = await retention(engine="api", **QUICK)
        assert dry.flow_runs_deleted == report.flow_runs_deleted == len(expected)
        assert report.rows_deleted == dry.rows_deleted
        # Nothing waits for a log deletion that never comes.
        assert report.seconds < api_logs.LOG_STALL_SECONDS
        stay = (
            "this server (Prefect 3.1.15) never deletes the logs of deleted runs (Prefect does from "
            f"3.4.9): the logs of the {len(expected)} "
        )
        assert any(
            stay + "runs to delete would stay until a retention run with database" in note
            for note in dry.notes
        )
        assert any(
            stay + "deleted runs stay until a retention run with database" in note for note in report.notes
        )
        cache_rows = "the task run cache rows of the deleted runs (if they had any) could not be removed"
        assert any(cache_rows in note for note in dry.notes) and any(
            cache_rows in note for note in report.notes
        )
        assert not any("waited" in note for note in dry.notes + report.notes)
        assert not await existing(expected)
        assert await scalar(logs_of_expected, ids=list(expected)) == logs
        left = await count_orphans()
        assert left["log"] == logs and left["task_run_state_cache"] == 3

        # What the notes promise: a run with database access and include_orphans sweeps them.
        sweep = await retention(engine="sql", include_orphans=True, **QUICK)
        assert sweep.flow_runs_deleted == 0
        assert sweep.orphan_rows_deleted == {"log": logs, "task_run_state_cache": 3}
        assert await count_orphans() == dict.fromkeys(left, 0)


async def test_with_the_database_the_api_engine_leaves_nothing_the_runs_owned(fresh_server):
    server = fresh_server(version="3.1.15")
    with serving(server):
        history = await seed_messy_history(server.database_url, prefix="owned", poison_pill=False)
        expected = history.expired_by_default()
        logs = await scalar("SELECT count(*) FROM log WHERE flow_run_id IN :ids", ids=list(expected))
        dry = await retention(dry_run=True, engine="api", **QUICK)
        report = await retention(engine="api", **QUICK)
        assert dry.flow_runs_deleted == report.flow_runs_deleted == len(expected)
        assert dry.rows_deleted == report.rows_deleted
        assert report.rows_deleted["log"] == logs and report.rows_deleted["task_run_state_cache"] == 3
        through_the_database = "never deletes the logs of deleted runs (Prefect does from 3.4.9); this run"
        assert any(
            f"{through_the_database} would delete them through the database" in note for note in dry.notes
        )
        assert any(
            f"{through_the_database} deleted them through the database" in note for note in report.notes
        )
        assert not any("could not be removed" in note for note in dry.notes + report.notes)
        assert not await existing(expected)
        assert await count_orphans() == dict.fromkeys(await count_orphans(), 0)
