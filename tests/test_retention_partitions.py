"""Retention on partitioned event tables (docs/scale.md): the days whose every event is past
the age are dropped whole, the day that straddles the age is deleted row by row, the dry run
says exactly that, and a partition that cannot be detached is left whole while its old rows
go row by row."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
import sqlalchemy as sa
from conftest import serving
from history import database_of, scalar
from prefect.server.services.db_vacuum import vacuum_events_with_retention_overrides, vacuum_old_events
from prefect.settings import temporary_settings

from bench.baselines import prefect_server_database
from deploy import PROJECT_ROOT
from flows.db_health import db_health_report
from flows.retention import retention
from tasks.database import connect
from tasks.prefect_api import HEARTBEAT_EVENT

SCRIPTS = PROJECT_ROOT / "docs" / "partitioning"
EVENTS_DAYS = 3
HEARTBEAT_DAYS = 1
OPTIONS = {
    "engine": "sql",
    "older_than_days": 3650,
    "events_older_than_days": EVENTS_DAYS,
    "heartbeat_events_older_than_days": HEARTBEAT_DAYS,
    "include_orphans": False,
    "vacuum": False,
}
# A database converted a week ago: its old table gone with its last day, a partition for each
# day since (the convert script makes them from the day after tomorrow on).
DAYS_SINCE_THE_CONVERSION = """
SET TIME ZONE 'UTC';
DO $$
DECLARE
    parent text;
    day int;
BEGIN
    FOREACH parent IN ARRAY ARRAY['events', 'event_resources'] LOOP
        EXECUTE format('DROP TABLE %I', parent || '_before_' || to_char(current_date + 2, 'YYYYMMDD'));
        FOR day IN -6..1 LOOP
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                parent || '_' || to_char(current_date + day, 'YYYYMMDD'), parent, current_date + day, current_date + day + 1
            );
        END LOOP;
    END LOOP;
END
$$;
"""
# An event every two hours over the last six days (every sixth a heartbeat), each with its
# own resource row and a related one, as Prefect writes them.
EVENTS_SQL = f"""
WITH made AS (
    INSERT INTO events (id, occurred, event, resource_id, resource, payload, received, recorded)
    SELECT gen_random_uuid(), now() - make_interval(hours => hours),
           CASE WHEN hours % 12 = 1 THEN '{HEARTBEAT_EVENT}' ELSE 'prefect.flow-run.Completed' END,
           'prefect.flow-run.partitioned-' || hours, '{{}}'::json, '{{}}'::json, now(), now()
    FROM generate_series(1, 143, 2) AS hours
    RETURNING id, occurred, resource_id
)
INSERT INTO event_resources (id, occurred, resource_id, resource_role, resource, event_id)
SELECT gen_random_uuid(), occurred, resource_id, '', '{{}}'::json, id FROM made
UNION ALL
SELECT gen_random_uuid(), occurred, 'prefect.flow.partitioned', 'flow', '{{}}'::json, id FROM made
"""
PAST_AGE = f"""
occurred < now() - make_interval(days => {EVENTS_DAYS})
OR (event = '{HEARTBEAT_EVENT}' AND occurred < now() - make_interval(days => {HEARTBEAT_DAYS}))
"""
OURS = "resource_id LIKE 'prefect.flow-run.partitioned-%'"


@pytest.fixture
async def partitioned(stack, fresh_server):
    """A 3.9 server whose event tables were converted to daily partitions a week ago, with six days of events."""
    server = fresh_server()
    database = database_of(server)
    stack.postgres.psql_file(SCRIPTS / "convert-events.sql", database=database)
    stack.postgres.psql(DAYS_SINCE_THE_CONVERSION, database=database)
    with serving(server):
        async with connect() as connection:
            await connection.execute(sa.text(EVENTS_SQL))
            await connection.execute(sa.text("ANALYZE events, event_resources"))
            await connection.commit()
        yield server


def days_past_the_age() -> list[date]:
    """The days whose partitions hold only events past the age: each ends before it."""
    cutoff = datetime.now(UTC) - timedelta(days=EVENTS_DAYS)
    today = datetime.now(UTC).date()
    days = [today + timedelta(days=offset) for offset in range(-6, 2)]
    return [day for day in days if _midnight_after(day) <= cutoff]


def partitions_of_days(table: str, days: list[date]) -> list[str]:
    return [f"{table}_{day:%Y%m%d}" for day in days]


def _midnight_after(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)


async def partitions_of(table: str) -> set[str]:
    listed = await scalar(
        "SELECT string_agg(inhrelid::regclass::text, ' ') FROM pg_inherits WHERE inhparent = CAST(:table AS regclass)",
        table=table,
    )
    return set(listed.split())


async def counts_past_the_age() -> tuple[int, int]:
    events = await scalar(f"SELECT count(*) FROM events WHERE {OURS} AND ({PAST_AGE})")
    resources = await scalar(
        f"SELECT count(*) FROM event_resources WHERE event_id IN (SELECT id FROM events WHERE {OURS} AND ({PAST_AGE}))"
    )
    return events, resources


async def test_whole_days_past_the_age_are_dropped_and_the_straddling_day_deleted_row_by_row(partitioned):
    days = days_past_the_age()
    old_days = {table: partitions_of_days(table, days) for table in ("events", "event_resources")}
    assert len(days) >= 2
    in_old_days = await scalar(
        "SELECT count(*) FROM events WHERE occurred < :end", end=_midnight_after(days[-1])
    )
    past_age, resources_past_age = await counts_past_the_age()
    kept = await scalar(f"SELECT count(*) FROM events WHERE {OURS} AND NOT ({PAST_AGE})")
    assert 0 < in_old_days < past_age and kept > 0

    dry = await retention(dry_run=True, **OPTIONS)
    assert {(partition.table, partition.partition) for partition in dry.partitions_dropped} == {
        (table, name) for table, names in old_days.items() for name in names
    }
    assert all(partition.rows_estimated and partition.bytes > 0 for partition in dry.partitions_dropped)
    # What the row deletes count is only what the dropped days do not hold.
    assert dry.event_rows_deleted == {
        "events": past_age - in_old_days,
        "event_resources": 2 * (past_age - in_old_days),
    }
    assert set(old_days["events"]) <= await partitions_of("events")
    assert await counts_past_the_age() == (past_age, resources_past_age)

    real = await retention(dry_run=False, **OPTIONS)
    assert real.partitions_dropped == dry.partitions_dropped
    assert real.event_rows_deleted == dry.event_rows_deleted
    assert not set(old_days["events"]) & await partitions_of("events")
    assert not set(old_days["event_resources"]) & await partitions_of("event_resources")
    assert await counts_past_the_age() == (0, 0)
    assert await scalar(f"SELECT count(*) FROM events WHERE {OURS}") == kept
    # Every kept event still has both of its resource rows.
    assert (
        await scalar(
            f"SELECT count(*) FROM event_resources WHERE event_id IN (SELECT id FROM events WHERE {OURS})"
        )
        == 2 * kept
    )
    markdown = real.to_markdown()
    assert "## Partitions dropped" in markdown and old_days["events"][0] in markdown
    assert f"{2 * len(days)} partitions dropped" in real.summary()

    again = await retention(dry_run=True, **OPTIONS)
    assert again.partitions_dropped == [] and again.event_rows_deleted == {}


async def test_a_partition_that_cannot_be_detached_stays_whole_and_its_rows_go_row_by_row(partitioned):
    old_days = partitions_of_days("events", days_past_the_age())
    past_age, _ = await counts_past_the_age()
    async with connect() as holder:
        # A long reader of events: DETACH waits for it until lock_timeout, then gives up.
        await holder.execute(sa.text("LOCK TABLE events IN ACCESS SHARE MODE"))
        report = await retention(dry_run=False, **OPTIONS)
        await holder.rollback()

    assert {partition.table for partition in report.partitions_dropped} == {"event_resources"}
    assert set(old_days) <= await partitions_of("events")
    assert any(
        f"Partition {old_days[0]} was kept (busy (lock_timeout reached))" in note for note in report.notes
    ), report.notes
    assert report.event_rows_deleted["events"] == past_age
    assert await counts_past_the_age() == (0, 0)

    # The next run, with nobody in the way, drops the days it emptied.
    after = await retention(dry_run=False, **OPTIONS)
    assert {partition.partition for partition in after.partitions_dropped} == set(old_days)
    assert not set(old_days) & await partitions_of("events")


async def test_the_health_report_reads_partitioned_event_tables(partitioned):
    report = await db_health_report(exact=True)
    assert not [note for note in report.notes if "could not run" in note], report.notes
    # Each partition is a table of its own on disk, sized and checked like one.
    surveyed = {table.name for table in report.tables}
    assert {f"events_{day:%Y%m%d}" for day in days_past_the_age()} <= surveyed, surveyed


async def test_prefects_own_event_vacuum_works_on_partitioned_tables(partitioned):
    """For users who leave events to the server: the db_vacuum service's event functions
    (3.9), called as the service calls them, delete through the partitioned tables too."""
    assert (await counts_past_the_age())[0] > 0
    settings = {
        "server.events.retention_period": timedelta(days=EVENTS_DAYS),
        "server.services.db_vacuum.event_retention_overrides": {
            HEARTBEAT_EVENT: timedelta(days=HEARTBEAT_DAYS)
        },
    }
    async with prefect_server_database(partitioned.database_url) as database:
        with temporary_settings(settings):
            await vacuum_events_with_retention_overrides(db=database)
            await vacuum_old_events(db=database)
    assert await counts_past_the_age() == (0, 0)
    assert await scalar(f"SELECT count(*) FROM events WHERE {OURS} AND NOT ({PAST_AGE})") > 0
    assert (
        await scalar(
            "SELECT count(*) FROM event_resources AS resource WHERE resource.resource_id LIKE 'prefect.flow-run.partitioned-%' "
            "AND NOT EXISTS (SELECT FROM events WHERE events.id = resource.event_id)"
        )
        == 0
    )
