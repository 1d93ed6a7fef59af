"""The retention flow on a real Prefect server and PostgreSQL, with a messy seeded history.

The story of a platform team: a dry run first, whose count the real purge then matches;
every rule deletes what it says and nothing else; whole subflow trees go or stay; nothing
they owned is left behind; a second run finds nothing; both engines agree. Then what can
go wrong: a run that comes back to life mid-purge, a database connection killed inside a
batch, two purges at once, a time budget running out, bad parameters.

The tests that count what is in the whole database (the nightly purge, the API engine's
purge, the orphan sweep) each have a server of their own. The others share one server of
this module: its seeded history is only ever read, and every test that deletes is scoped
to flows of its own.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from conftest import serving
from history import (
    QUICK,
    DeadlineAfterChecks,
    existing,
    flow_names_of,
    old_finished_runs,
    owned_rows,
    rows,
    scalar,
    terminate_waiting_maintenance_session,
    waiting_maintenance_session,
)
from prefect import flow
from prefect.client.schemas.objects import StateType
from prefect.states import Scheduled
from sqlalchemy.ext.asyncio import create_async_engine

from flows.retention import retention
from localstack.orphans import count_orphans
from localstack.seed import MessyHistory, seed_messy_history
from tasks.database import connect
from tasks.prefect_api import PrefectApiError, call, prefect_client
from tasks.reports import human_bytes
from tasks.retention import api_engine, api_logs
from tasks.retention.api_engine import ATTEMPTS, ApiEngine
from tasks.retention.artifact_collections import REPOINTED
from tasks.retention.parameters import RetentionParameters
from tasks.retention.policy import CHANGED, RetentionPolicy, RunRecord
from tasks.retention.purge import limitations, purge_expired_runs
from tasks.retention.rate_limit import Throttle
from tasks.retention.report import BREAKDOWN_KEY, REPORT_KEY
from tasks.retention.selection import build_policy, count_expired_runs, expired_batches, open_engine
from tasks.retention.sql_engine import ADVISORY_LOCK_KEY, RetentionAlreadyRunning
from tasks.settings import get_settings


@pytest.fixture(scope="module")
async def history(module_server) -> MessyHistory:
    """The module server's seeded history: read, never purged."""
    with serving(module_server):
        return await seed_messy_history(module_server.database_url, prefix="purge")


async def would_delete(engine: str, **values) -> set[uuid.UUID]:
    """The flow runs a dry run with these parameters counts, through the flow's own selection."""
    parameters = RetentionParameters(engine=engine, **values)
    async with open_engine(engine, Throttle(0)) as chosen:
        policy = await build_policy(chosen, parameters)
        ids = set()
        async for batch in expired_batches(chosen, policy, parameters.batch_size):
            ids |= {run.id for run in (await chosen.process_batch(batch.runs, policy, dry_run=True)).runs}
    return ids


async def old_runs(count: int, prefix: str, *, days: float = 90) -> tuple[list[uuid.UUID], list[str]]:
    """Finished runs `days` old, each with a few logs: their ids, and the flow names to scope to."""
    runs = await old_finished_runs(prefix, count, days=days, artifacts=False)
    return runs.ids, runs.flow_names


async def test_every_rule_selects_what_it_says_and_both_engines_agree(on_module_server, history):
    everything = history.expired_by_default()
    tree = set(history.old_tree)
    hourly = set(history.old_finished_by_deployment["purge-etl/hourly"])
    failed_roots = set(history.old_finished_by_state["FAILED"]) - set(history.old_subflows)
    young_failed = failed_roots - await older_than(failed_roots, 100)
    assert 0 < len(young_failed) < len(failed_roots)
    crashed = set(
        history.old_finished_by_state["CRASHED"] + history.terminal_without_end_time_by_state["CRASHED"]
    )
    # The newest two finished runs of each deployment are its recent run and its newest old run.
    newest_old = {runs[0] for runs in history.old_finished_by_deployment.values()}
    cases = [
        ({}, everything),
        ({"exclude_tags": ["purge-keep"]}, everything - {history.keep_tagged}),
        ({"per_state_days": {"FAILED": 100}}, everything - young_failed),
        ({"states": ["CRASHED"]}, crashed),
        ({"keep_last_per_deployment": 2}, everything - newest_old),
        ({"deployment_names": ["purge-etl/hourly"]}, hourly),
        ({"flow_names": ["purge-adhoc"]}, tree | set(history.terminal_without_end_time)),
        ({"tags": ["purge-team-b"]}, hourly | tree),
        ({"older_than_days": 100}, await older_than(everything, 100)),
    ]
    # Within the seeded flows: the module's other tests add old runs of their own.
    seeded = {"flow_names": history.flow_names}
    for values, expected in cases:
        assert await would_delete("sql", **{**seeded, **values}) == expected, values
        assert await would_delete("api", **{**seeded, **values}) == expected, values

    # What no rule ever selects: runs not finished, in unfinished trees, or in an unknown state.
    never = (
        set(history.unknown_state)
        | {history.old_finished_parent, *history.running_subflow_under_finished_parent}
        | {history.cancelled_parent, *history.cancelling_subflows}
        | set(history.late + history.zombie_running + history.stuck_pending + history.null_state_timestamp)
    )
    assert not never & await would_delete("sql", older_than_days=0.05, **seeded)


async def older_than(run_ids, days: float) -> set[uuid.UUID]:
    found = await rows(
        "SELECT id FROM flow_run WHERE id IN :ids "
        "AND coalesce(end_time, state_timestamp) < now() - make_interval(days => :days)",
        ids=list(run_ids),
        days=days,
    )
    return {row.id for row in found}


async def test_nightly_purge_of_a_messy_history_with_the_sql_engine(on_fresh_server):
    history = await seed_messy_history(on_fresh_server.database_url, prefix="purge")
    expected = history.expired_by_default() - {history.keep_tagged}
    seeded = history.flow_runs()
    before = await owned_rows(seeded)

    dry = await retention(dry_run=True, engine="sql", exclude_tags=["purge-keep"], **QUICK)
    assert dry.flow_runs_deleted == len(expected) == 16
    assert dry.by_deployment == {
        "(no deployment)": 5,
        "purge-etl/hourly": 4,
        "purge-report/daily": 4,
        "purge-etl/nightly": 3,
    }
    assert dry.by_flow == {"purge-etl": 7, "purge-adhoc": 5, "purge-report": 4}
    assert sum(dry.by_state.values()) == 16
    assert dry.left == {"a run in its tree is not finished": 1}
    assert await count_expired_runs(RetentionParameters(exclude_tags=("purge-keep",))) == 16
    assert await existing(seeded) == seeded and await owned_rows(seeded) == before, (
        "a dry run changes nothing"
    )

    cascaded = {
        "flow_run_state": await scalar(
            "SELECT count(*) FROM flow_run_state WHERE flow_run_id IN :ids", ids=list(expected)
        ),
        "task_run_state": await scalar(
            "SELECT count(*) FROM task_run_state JOIN task_run ON task_run.id = task_run_state.task_run_id "
            "WHERE task_run.flow_run_id IN :ids",
            ids=list(expected),
        ),
    }
    state = await retention(engine="sql", exclude_tags=["purge-keep"], **QUICK, return_state=True)
    report = await state.result()
    assert report.flow_runs_deleted == dry.flow_runs_deleted
    # Every table the real run deleted from, artifact collections included, the dry run counted.
    assert report.rows_deleted == dry.rows_deleted
    # And it measured the space of the very rows the real run deleted.
    assert report.bytes_deleted == dry.bytes_deleted
    assert set(report.bytes_deleted) == set(report.rows_deleted) - {"artifact_collection", REPOINTED}
    # The rows the deletes cascade to are counted too, exactly, in the dry run as well.
    assert {table: dry.rows_deleted[table] for table in cascaded} == cascaded
    assert all(cascaded.values())
    assert report.rows_deleted["task_run_state_cache"] == 3
    assert report.rows_deleted["artifact_collection"] == 2
    assert report.rows_deleted["artifact_collection re-pointed"] == 1
    assert await existing(seeded) == seeded - expected
    assert await owned_rows(expected) == {"task_run": 0, "log": 0, "artifact": 0, "flow_run_state": 0}
    assert await count_orphans() == dict.fromkeys(await count_orphans(), 0)
    # The running subflow under the old failed parent still has its parent: no fake top-level run.
    (running_subflow,) = history.running_subflow_under_finished_parent
    assert await scalar(
        "SELECT parent_task_run_id IS NOT NULL FROM flow_run WHERE id = :id", id=running_subflow
    )
    # The keep-tagged run's collection now points at it: the next newest artifact of its key.
    (key,) = [key for key, runs in history.runs_by_artifact_key.items() if history.keep_tagged in runs]
    latest = await scalar(
        "SELECT a.flow_run_id FROM artifact_collection c JOIN artifact a ON a.id = c.latest_id WHERE c.key = :key",
        key=key,
    )
    assert latest == history.keep_tagged

    async with prefect_client() as client:
        artifacts = await call(
            client,
            "POST",
            "/artifacts/filter",
            json={"artifacts": {"flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}}},
        )
    published = {(artifact["key"], artifact["type"]) for artifact in artifacts}
    # One kind of artifact per key, so that each key's history in the UI reads as one story.
    assert published == {(REPORT_KEY, "markdown"), (BREAKDOWN_KEY, "table"), (None, "progress")}
    card = next(artifact for artifact in artifacts if artifact["type"] == "markdown")
    space = human_bytes(report.bytes_total)
    assert card["description"] == f"deleted 16 flow runs · {space} of rows · sql · {report.seconds:,.1f} s"
    markdown = card["data"]
    assert "deleted 16 flow runs" in markdown and "purge-etl/hourly" in markdown
    assert "## Rows deleted with the runs" in markdown and "1 batches" not in markdown
    assert "| rows | space | table |" in markdown and f"| **{space}** | **total** |" in markdown
    assert f"the deleted rows took about {space}" in markdown and "`VACUUM FULL` or `pg_repack`" in markdown
    # The sample is oldest first, its times to the minute, its subflows said to go with their parent.
    finished = [run.finished for run in report.sample]
    assert finished == sorted(finished)
    assert re.search(r"\| \d{4}-\d\d-\d\d \d\d:\d\d UTC \|", markdown)
    assert any(run.subflow for run in report.sample) and "(subflow: goes with its parent)" in markdown
    assert f"/runs/flow-run/{report.sample[0].id})" in markdown

    again = await retention(engine="sql", exclude_tags=["purge-keep"], **QUICK)
    assert again.flow_runs_deleted == 0


async def test_the_api_engine_purges_the_same_way(on_fresh_server):
    history = await seed_messy_history(on_fresh_server.database_url, prefix="api", poison_pill=False)
    expected = history.expired_by_default()
    dry = await retention(dry_run=True, engine="api", **QUICK)
    assert dry.engine == "api" and dry.flow_runs_deleted == len(expected) == 17
    report = await retention(engine="api", **QUICK)
    assert report.flow_runs_deleted == len(expected)
    # With the database configured, the cache rows the API cannot delete go through it.
    assert report.rows_deleted == dry.rows_deleted
    assert {
        table: report.rows_deleted[table] for table in ("artifact", "flow_run", "task_run_state_cache")
    } == {
        "artifact": 13,
        "flow_run": 17,
        "task_run_state_cache": 3,
    }
    # The API does not say how big rows are: no figure, and the report says so.
    assert report.bytes_deleted is None and "Space: not estimated" in report.to_markdown()
    assert any("this run waited for it" in note for note in report.notes)
    assert not await existing(expected)
    assert await existing(history.recent_finished) == set(history.recent_finished)
    assert await scalar("SELECT count(*) FROM artifact WHERE flow_run_id IN :ids", ids=list(expected)) == 0
    # The server re-pointed or removed the collections of the deleted artifacts, and deleted
    # the runs' logs in its background queue before the flow returned.
    assert await count_orphans() == dict.fromkeys(await count_orphans(), 0)
    assert await scalar("SELECT count(*) FROM log WHERE flow_run_id IN :ids", ids=list(expected)) == 0
    assert (await retention(engine="api", **QUICK)).flow_runs_deleted == 0


async def insert_logs(connection, flow_run_id: uuid.UUID, count: int) -> None:
    """Log rows of a flow run, written as the server writes them."""
    await connection.execute(
        sa.text(
            "INSERT INTO log (id, name, level, flow_run_id, message, timestamp) "
            "SELECT gen_random_uuid(), 'x', 20, :run, 'a log line', now() FROM generate_series(1, :count)"
        ),
        {"run": flow_run_id, "count": count},
    )


async def test_the_api_engine_deletes_no_more_while_the_servers_log_queue_is_full(
    on_module_server, monkeypatch
):
    monkeypatch.setattr(api_engine, "LOG_QUEUE_RUNS", 0)
    # A run deleted earlier whose logs the server has not deleted yet.
    queued = uuid.uuid4()
    async with connect() as connection:
        await insert_logs(connection, queued, 2)
        await connection.commit()
    ids, flow_names = await old_runs(3, "log-queue")
    parameters = RetentionParameters(engine="api", flow_names=tuple(flow_names))
    async with open_engine("api", Throttle(0)) as engine:
        policy = await build_policy(engine, parameters)
        [batch] = [batch.runs async for batch in expired_batches(engine, policy, 10)]
        engine.logs.expect([queued])
        deleting = asyncio.create_task(engine.process_batch(batch, policy, dry_run=False))
        await asyncio.sleep(2)
        assert not deleting.done() and await existing(ids) == set(ids), "the batch waits for the server"
        async with connect() as connection:  # the server gets to it
            await connection.execute(sa.text("DELETE FROM log WHERE flow_run_id = :id"), {"id": queued})
            await connection.commit()
        outcome = await deleting
        assert {run.id for run in outcome.runs} == set(ids)
        assert await engine.wait_for_log_deletion() == 0
    assert not await existing(ids)
    assert await scalar("SELECT count(*) FROM log WHERE flow_run_id IN :ids", ids=ids) == 0


async def test_the_api_engine_stops_waiting_for_logs_the_server_does_not_delete(
    on_module_server, monkeypatch
):
    monkeypatch.setattr(api_logs, "LOG_STALL_SECONDS", 1.0)
    # A deleted run whose queued log deletion the server lost (say, in a restart).
    lost = uuid.uuid4()
    async with connect() as connection:
        await insert_logs(connection, lost, 1)
        await connection.commit()
    try:
        async with ApiEngine.open(None, Throttle(0), concurrency=2) as engine:
            engine.logs.expect([lost])
            assert await engine.wait_for_log_deletion() == 1
    finally:
        # Leave the module server as it was.
        async with connect() as connection:
            await connection.execute(sa.text("DELETE FROM log WHERE flow_run_id = :lost"), {"lost": lost})
            await connection.commit()
    notes = limitations(engine, RetentionParameters(engine="api"), logs_queued=1)
    assert any("up to 1 deleted run were still in the server's deletion queue" in note for note in notes)


async def test_orphans_and_old_events_are_swept_in_batches(on_fresh_server):
    gone = uuid.uuid4()
    async with connect() as connection:
        await insert_logs(connection, gone, 7)
        artifact = uuid.uuid4()
        await connection.execute(
            sa.text(
                "INSERT INTO artifact (id, key, type, flow_run_id) VALUES (:id, 'orphan-key', 'markdown', :gone)"
            ),
            {"id": artifact, "gone": gone},
        )
        await connection.execute(
            sa.text(
                "INSERT INTO artifact_collection (id, key, latest_id) VALUES (gen_random_uuid(), 'orphan-key', :id)"
            ),
            {"id": artifact},
        )
        await connection.execute(
            sa.text(
                "INSERT INTO task_run_state_cache (id, cache_key, task_run_state_id) "
                "VALUES (gen_random_uuid(), 'orphan-cache', gen_random_uuid())"
            )
        )
        # Younger than the 7 days after which the server's own event vacuum (3.6.19 and later,
        # run as the server starts) deletes events: only this flow can delete these.
        for event, days in (
            ("prefect.flow-run.heartbeat", 2),
            ("prefect.flow-run.Completed", 2),
            ("prefect.flow-run.Completed", 5),
        ):
            event_id = uuid.uuid4()
            await connection.execute(
                sa.text(
                    "INSERT INTO events (id, occurred, event, resource_id, resource, payload, received, recorded) "
                    "VALUES (:id, now() - make_interval(days => :days), :event, 'prefect.flow-run.x', '{}', '{}', now(), now())"
                ),
                {"id": event_id, "days": days, "event": event},
            )
            await connection.execute(
                sa.text(
                    "INSERT INTO event_resources (id, occurred, resource_id, resource_role, resource, event_id) "
                    "VALUES (gen_random_uuid(), now() - make_interval(days => :days), 'prefect.flow-run.x', '', '{}', :id)"
                ),
                {"id": event_id, "days": days},
            )
        await connection.commit()
    inserted_events = "SELECT count(*) FROM events WHERE resource_id = 'prefect.flow-run.x'"
    found = await count_orphans()
    assert found["log"] == 7 and found["artifact"] == 1 and found["task_run_state_cache"] == 1

    options = {
        "engine": "sql",
        "include_orphans": True,
        "max_runs_per_second": 0,
        "vacuum": True,
        "events_older_than_days": 4,
    }
    dry = await retention(dry_run=True, **options)
    assert dry.orphan_rows_deleted == {table: count for table, count in sorted(found.items()) if count}
    assert dry.event_rows_deleted == {"event_resources": 2, "events": 2}
    assert await scalar(inserted_events) == 3
    assert await count_orphans() == found

    report = await retention(**options)
    assert report.orphan_rows_deleted == {**dry.orphan_rows_deleted, "artifact_collection": 1}
    assert report.event_rows_deleted == {"event_resources": 2, "events": 2}
    assert {"log", "artifact", "artifact_collection", "events", "event_resources"} <= set(
        report.vacuumed_tables
    )
    assert await count_orphans() == dict.fromkeys(await count_orphans(), 0)
    remaining = await rows(
        "SELECT event, occurred > now() - interval '3 days' AS young FROM events WHERE resource_id = 'prefect.flow-run.x'"
    )
    assert [(row.event, row.young) for row in remaining] == [("prefect.flow-run.Completed", True)]


@pytest.mark.parametrize("engine", ["sql", "api"])
async def test_a_run_that_comes_back_to_life_between_selection_and_deletion_is_not_deleted(
    on_module_server, engine
):
    ids, flow_names = await old_runs(3, f"revived-{engine}")
    revived, *purged = ids
    parameters = RetentionParameters(flow_names=tuple(flow_names), engine=engine)
    async with open_engine(engine, Throttle(0)) as chosen:
        policy = await build_policy(chosen, parameters)
        batch = [batch async for batch in expired_batches(chosen, policy, 10)][0]
        assert {run.id for run in batch.runs} == set(ids)
        # Someone retries the run from the UI after it was selected.
        async with prefect_client() as client:
            await client.set_flow_run_state(revived, Scheduled(), force=True)
        outcome = await chosen.process_batch(batch.runs, policy, dry_run=False)
    assert {run.id for run in outcome.runs} == set(purged)
    assert outcome.left == {CHANGED: 1}
    assert await existing(ids) == {revived}


async def test_a_killed_connection_rolls_back_its_batch_and_the_retry_finishes(
    on_module_server, module_server, monkeypatch
):
    ids, flow_names = await old_runs(6, "killed-connection")
    held = ids[3]  # any run of the one batch
    # Wait for our lock instead of giving up on it: this test ends the wait itself.
    monkeypatch.setenv("MAINTENANCE_LOCK_TIMEOUT_SECONDS", "120")
    get_settings(refresh=True)
    holder_engine = create_async_engine(
        module_server.database_url,
        connect_args={"server_settings": {"application_name": "retention-test"}},
    )
    try:
        async with holder_engine.connect() as holder, holder_engine.connect() as watcher:
            # pg_stat_activity is read once per transaction: watch from outside any.
            await watcher.execution_options(isolation_level="AUTOCOMMIT")
            await holder.execute(
                sa.text("SELECT id FROM log WHERE flow_run_id = :id FOR UPDATE"), {"id": held}
            )
            purge = asyncio.create_task(retention(engine="sql", flow_names=flow_names, **QUICK))
            terminated: set[int] = set()
            killed = await terminate_waiting_maintenance_session(watcher, terminated)
            # The retry waits on the same lock; meanwhile nothing of the batch is gone.
            await waiting_maintenance_session(watcher, terminated, what="the retry of the batch")
            assert await existing(ids) == set(ids)
            assert await scalar("SELECT count(*) FROM log WHERE flow_run_id IN :ids", ids=ids) == 12
            await holder.rollback()
        report = await purge
    finally:
        await holder_engine.dispose()
    assert killed
    assert report.flow_runs_deleted == 6 and report.stopped_reason == "finished"
    assert not await existing(ids)
    assert await scalar("SELECT count(*) FROM log WHERE flow_run_id IN :ids", ids=ids) == 0


async def test_two_purges_never_overlap(on_module_server, module_server):
    ids, flow_names = await old_runs(2, "overlap")
    holder_engine = create_async_engine(module_server.database_url)
    try:
        async with holder_engine.connect() as holder:
            await holder.execute(sa.select(sa.func.pg_advisory_lock(ADVISORY_LOCK_KEY)))
            with pytest.raises(RetentionAlreadyRunning, match="another retention run"):
                await retention(engine="sql", flow_names=flow_names, **QUICK)
            assert await existing(ids) == set(ids)
            # A dry run deletes nothing, so it does not need the lock.
            assert (
                await retention(engine="sql", flow_names=flow_names, dry_run=True, **QUICK)
            ).flow_runs_deleted == 2
            await holder.execute(sa.select(sa.func.pg_advisory_unlock(ADVISORY_LOCK_KEY)))
            await holder.commit()
    finally:
        await holder_engine.dispose()
    assert (await retention(engine="sql", flow_names=flow_names, **QUICK)).flow_runs_deleted == 2


async def test_max_minutes_stops_at_a_batch_boundary_and_says_what_remains(on_module_server):
    ids, flow_names = await old_runs(6, "time-budget")

    @flow
    async def two_batches_then_time_is_up():
        parameters = RetentionParameters(flow_names=tuple(flow_names), batch_size=2)
        async with open_engine("sql", Throttle(0)) as chosen:
            policy = await build_policy(chosen, parameters)
            return await purge_expired_runs(chosen, policy, parameters, Throttle(0), DeadlineAfterChecks(2))

    result = await two_batches_then_time_is_up()
    assert (result.stopped_reason, result.totals.flow_runs, result.totals.batches, result.remaining) == (
        "max_minutes",
        4,
        2,
        2,
    )
    assert len(await existing(ids)) == 2

    report = await retention(engine="sql", flow_names=flow_names, max_minutes=1e-6, **QUICK)
    assert (report.stopped_reason, report.flow_runs_deleted, report.remaining) == ("max_minutes", 0, 2)
    assert "2 expired top-level runs remain" in report.to_markdown()


@pytest.mark.parametrize(
    ("values", "parameter"),
    [
        ({"older_than_days": 0.01}, "older_than_days"),
        ({"states": ["RUNNING"]}, "states"),
        ({"per_state_days": {"LATE": 3}}, "per_state_days"),
        ({"engine": "fastest"}, "engine"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_runs_per_second": -5}, "max_runs_per_second"),
        ({"deployment_names": ["nobody/nothing"]}, "deployment_names"),
    ],
)
async def test_bad_input_fails_before_anything_is_touched(on_module_server, values, parameter):
    ids, flow_names = await old_runs(1, "bad-input")
    with pytest.raises(Exception, match=parameter):
        await retention(flow_names=flow_names, **values)
    assert await existing(ids) == set(ids)
    assert await scalar("SELECT count(*) FROM log WHERE flow_run_id IN :ids", ids=ids) == 2


async def test_the_api_engine_backs_off_when_the_server_fails(on_module_server, history):
    slept = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    throttle = Throttle(100, sleep=sleep)
    # A Running run with a NULL state_timestamp makes the server answer 500 for any page holding it.
    (poisoned,) = history.null_state_timestamp
    poison = RunRecord(
        id=poisoned,
        name="poison-pill",
        flow_id=uuid.uuid4(),
        deployment_id=None,
        state_type="COMPLETED",
        finished=datetime(2020, 1, 1, tzinfo=UTC),
        tags=(),
        parent_task_run_id=None,
    )
    policy = RetentionPolicy.from_parameters(RetentionParameters(), datetime.now(UTC))
    async with ApiEngine.open(None, throttle, concurrency=2) as engine:
        with pytest.raises(PrefectApiError) as failure:
            await engine.process_batch([poison], policy, dry_run=True)
    assert failure.value.status_code == 500
    assert slept == [0.5, 1.0, 2.0, 4.0][: ATTEMPTS - 1]
    assert throttle.slowdowns == ATTEMPTS - 1 and throttle.current_rate < 100


async def test_runs_running_or_created_during_a_purge_are_untouched(on_module_server):
    history = await seed_messy_history(on_module_server.database_url, prefix="alive")
    alive = set(history.zombie_running + history.healthy_running + history.stuck_pending + history.late)
    alive |= set(history.running_subflow_under_finished_parent) | {history.old_finished_parent}
    alive |= set(history.null_state_timestamp + history.fresh_pending + history.scheduled_tomorrow)
    born = "born-during-the-purge"
    # Every finished run of these flows older than about an hour is a candidate.
    scope = {"flow_names": history.flow_names + flow_names_of(born), "older_than_days": 0.05}
    _, (created, _) = await asyncio.gather(
        retention(engine="sql", batch_size=1, **scope, **QUICK),
        old_runs(5, born, days=0),
    )
    assert await existing(alive) == alive
    assert await existing(created) == set(created)
    async with prefect_client() as client:
        states = {(await client.read_flow_run(run_id)).state.type for run_id in history.zombie_running}
    assert states == {StateType.RUNNING}
