"""docs/scale.md's partition path, on a real Prefect database: `events` and `event_resources`
made partitioned by day under a live 3.4 server, that server still writing and reading
events, a Prefect 3.9 upgrade's migrations run by the documented steps, a 3.9 server
writing and reading events, retention's row deletes through the partitioned tables, and a
whole partition dropped."""

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import serving
from history import create_flow_run, database_of, scalar, wait_for

from deploy import PROJECT_ROOT
from flows.retention import retention
from localstack.stack import PrefectServer, free_port
from tasks.prefect_api import call, prefect_client

SCRIPTS = PROJECT_ROOT / "docs" / "partitioning"
# The last 3.9 migration before the first that builds an index on event_resources
# CONCURRENTLY, and the last of those that must be stamped instead (docs/scale.md).
BEFORE_CONCURRENT_INDEXES = "7218aad17905"
CONCURRENT_INDEXES_DONE = "50737cdaee36"


async def events_of_runs(prefix: str, count: int) -> list[uuid.UUID]:
    """`count` runs through Pending, Running, Completed: the server stores an event for each."""
    runs = [
        await create_flow_run(f"{prefix}-flow", ["PENDING", "RUNNING", "COMPLETED"], name=f"{prefix}-{index}")
        for index in range(count)
    ]
    for run_id in runs:
        await wait_for(
            lambda run_id=run_id: stored_events(run_id), what=f"the events of {run_id}", timeout=60, pause=0.5
        )
    return runs


async def stored_events(run_id: uuid.UUID) -> bool:
    count = await scalar(
        "SELECT count(*) FROM events WHERE resource_id = :resource", resource=f"prefect.flow-run.{run_id}"
    )
    return count >= 3


STATE_EVENTS = {"prefect.flow-run.Pending", "prefect.flow-run.Running", "prefect.flow-run.Completed"}


async def events_read_back(run_id: uuid.UUID) -> set[str]:
    async with prefect_client() as client:
        page = await call(
            client,
            "POST",
            "/events/filter",
            json={"limit": 50, "filter": {"any_resource": {"id": [f"prefect.flow-run.{run_id}"]}}},
        )
    return {event["event"] for event in page["events"]}


def partitions(stack, database: str, table: str) -> list[str]:
    listed = stack.postgres.psql(
        f"SELECT child.relname FROM pg_inherits JOIN pg_class child ON child.oid = inhrelid "
        f"WHERE inhparent = '{table}'::regclass ORDER BY 1",
        database=database,
    )
    return listed.split()


def prefect_database(server: PrefectServer, *arguments: str) -> None:
    """`prefect server database ...` with this project's (the newer) Prefect."""
    environment = {
        **os.environ,
        "PREFECT_API_DATABASE_CONNECTION_URL": server.database_url,
        "PREFECT_HOME": str(server.home / "upgrade-home"),
    }
    result = subprocess.run(
        [str(Path(sys.executable).with_name("prefect")), "server", "database", *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


async def test_partitioned_events_survive_a_3_4_server_a_3_9_upgrade_and_retention(
    stack, fresh_server, tmp_path
):
    old = fresh_server(version="3.4.25")
    database = database_of(old)
    with serving(old):
        before = await events_of_runs("before", 2)
        stack.postgres.psql_file(SCRIPTS / "convert-events.sql", database=database)
        for table in ("events", "event_resources"):
            made = partitions(stack, database, table)
            assert len(made) == 9, made  # the old table, 7 days ahead, the default
        # add-partitions.sql makes the days up to a week ahead that are missing.
        ahead = [f"events_{datetime.now(UTC).date() + timedelta(days=days):%Y%m%d}" for days in (6, 7, 8)]
        stack.postgres.psql(f"DROP TABLE {', '.join(ahead)}", database=database)
        stack.postgres.psql_file(SCRIPTS / "add-partitions.sql", database=database)
        assert ahead[0] in partitions(stack, database, "events")
        assert not set(ahead[1:]) & set(partitions(stack, database, "events"))
        # The old server goes on writing (into the old table, until the first new day)
        # and reading events as before, its own and those from before the switch.
        after = await events_of_runs("after", 2)
        assert await events_read_back(before[0]) == await events_read_back(after[0]) == STATE_EVENTS
    old.stop()

    # A 3.9 server's migrations build two event_resources indexes CONCURRENTLY, which
    # PostgreSQL refuses on a partitioned table: unchanged, the new server does not start.
    new = PrefectServer(home=tmp_path / "new", database_url=old.database_url, port=free_port())
    try:
        new.start()
        raise AssertionError("the 3.9 server started without the documented upgrade steps")
    except RuntimeError as error:
        assert "cannot create index on partitioned table" in str(error)
    prefect_database(new, "upgrade", "-y", "--revision", BEFORE_CONCURRENT_INDEXES)
    stack.postgres.psql_file(SCRIPTS / "before-upgrade-3.8.sql", database=database)
    prefect_database(new, "stamp", CONCURRENT_INDEXES_DONE)
    prefect_database(new, "upgrade", "-y")
    new.start()
    try:
        with serving(new):
            newest = await events_of_runs("newest", 1)
            assert await events_read_back(newest[0]) == await events_read_back(before[0]) == STATE_EVENTS

            # Retention's row deletes go through the partitioned tables like any other.
            stack.postgres.psql(
                "WITH moved AS (UPDATE events SET occurred = occurred - interval '30 days' "
                f"WHERE resource_id = 'prefect.flow-run.{before[0]}' RETURNING id) "
                "UPDATE event_resources SET occurred = occurred - interval '30 days' "
                "WHERE event_id IN (SELECT id FROM moved)",
                database=database,
            )
            past_age = "SELECT count(*) FROM events WHERE occurred < now() - interval '7 days'"
            moved = await scalar(past_age)
            assert moved >= 3
            report = await retention(
                engine="sql", older_than_days=3650, events_older_than_days=7, vacuum=False
            )
            assert report.event_rows_deleted["events"] == moved
            assert await scalar(past_age) == 0
            assert await events_read_back(before[0]) == set()
            assert await events_read_back(before[1]) == STATE_EVENTS

            # A whole partition past the age: dropped, not deleted row by row. Here the old
            # table, by an age that reaches past its last day.
            stack.postgres.psql_file(
                SCRIPTS / "drop-partitions.sql", database=database, variables={"days": "-3"}
            )
            assert all("before" not in name for name in partitions(stack, database, "events"))
            assert await events_read_back(after[0]) == set()
            newer = await events_of_runs("newer", 1)
            assert await events_read_back(newer[0]) == STATE_EVENTS
    finally:
        new.stop()
