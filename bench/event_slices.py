"""The events benchmark's database: N events with their resources, kept between runs.

Events are written with set-based SQL the way Prefect writes them: one `events` row, and one
`event_resources` row for its own resource (role '') and for each related resource, with
the event's `occurred`. Every flow run leaves ten: three state changes (Pending, Running,
Completed; related: its flow, deployment and work queue), three heartbeats (flow and
deployment) and four state changes of its two task runs (the flow run and the flow), so
3.3 resource rows an event.

The database (`bench_events`) holds time windows relative to an anchor written at the first
seed, so that ages stay put however long the seed is kept:
- `kept`: the bulk of N, 1 hour to 30 days older than the anchor; no method touches it;
- one window of a day per method, older, the oldest for the method that runs first (every
  method deletes "everything older than", so each runs once the older windows are gone),
  with two hours between windows so that no window drifts into its neighbour's cutoff.
A run tops `kept` up to its share of N and seeds each method's window afresh (a run deletes
them all); `--fresh` drops the database first. The `log` table is filled the same way (ten
lines per flow run) for the logs measurement.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.database import connect

KEPT = "kept"
EVENTS_PER_RUN = 10
LOGS_PER_RUN = 10
KEPT_WINDOW = (timedelta(hours=1), timedelta(days=30))
SLICE_WINDOW = timedelta(days=1)
SLICE_GAP = timedelta(hours=2)
SEED_CHUNK_EVENTS = 250_000
SEED_CHUNK_LOGS = 1_000_000
LOG_SLICE_PREFIX = "bench-log-slice"
# Seeding stops (and says so) when the disk of the database has less than this left: the
# machine is shared, and a full disk stops every PostgreSQL on it.
DISK_RESERVE_BYTES = 12 * 2**30
BULK_LOAD_MAX_WAL_SIZE = "4GB"
# A load of at least this many rows drops the table's secondary indexes and builds them after.
BULK_LOAD_ROWS = 1_000_000
INDEX_BUILD_MEMORY = "1GB"
EVENT_TABLES = ("events", "event_resources")
# Seeding, counting and VACUUM of tables of tens of millions of rows take minutes.
SLOW_STATEMENT_TIMEOUT_SECONDS = 6 * 3600

log = logging.getLogger("bench.events")

_RECORDS = """
CREATE SCHEMA IF NOT EXISTS bench;
CREATE TABLE IF NOT EXISTS bench.event_anchor (anchor timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS bench.dropped_index (name text PRIMARY KEY, definition text NOT NULL);
CREATE TABLE IF NOT EXISTS bench.log_seed (name text PRIMARY KEY, lines bigint NOT NULL)
"""

# One chunk of events numbered :first ..: first + :size - 1 of :total in the window
# [:low, :low + :span seconds), under :prefix (which names its flow runs).
_EVENT_CHUNK = (
    """
    CREATE TEMP TABLE event_chunk ON COMMIT DROP AS
    SELECT gen_random_uuid() AS id, kind, occurred,
           CASE WHEN kind < 6 THEN flow_run ELSE task_run END AS resource_id,
           jsonb_build_object('prefect.resource.id', CASE WHEN kind < 6 THEN flow_run ELSE task_run END,
                              'prefect.resource.name', run_name) AS resource,
           CASE WHEN kind < 3 THEN jsonb_build_array(
                    jsonb_build_object('prefect.resource.id', flow, 'prefect.resource.role', 'flow'),
                    jsonb_build_object('prefect.resource.id', deployment, 'prefect.resource.role', 'deployment'),
                    jsonb_build_object('prefect.resource.id', work_queue, 'prefect.resource.role', 'work-queue'))
                WHEN kind < 6 THEN jsonb_build_array(
                    jsonb_build_object('prefect.resource.id', flow, 'prefect.resource.role', 'flow'),
                    jsonb_build_object('prefect.resource.id', deployment, 'prefect.resource.role', 'deployment'))
                ELSE jsonb_build_array(
                    jsonb_build_object('prefect.resource.id', flow_run, 'prefect.resource.role', 'flow-run'),
                    jsonb_build_object('prefect.resource.id', flow, 'prefect.resource.role', 'flow'))
           END AS related
    FROM (
        SELECT g % 10 AS kind,
               CAST(:low AS timestamptz) + make_interval(secs => CAST(:span AS float8) * g / CAST(:total AS bigint))
                   AS occurred,
               'prefect.flow-run.' || md5(CAST(:prefix AS text) || '-run-' || (g / 10))::uuid AS flow_run,
               'prefect.task-run.' || md5(CAST(:prefix AS text) || '-task-' || (g / 10) || '-' || (g % 10 / 8))::uuid
                   AS task_run,
               'prefect.flow.' || md5(CAST(:prefix AS text) || '-flow-' || (g / 10 % 40))::uuid AS flow,
               'prefect.deployment.' || md5(CAST(:prefix AS text) || '-deployment-' || (g / 10 % 200))::uuid
                   AS deployment,
               'prefect.work-queue.' || md5(CAST(:prefix AS text) || '-queue-' || (g / 10 % 5))::uuid AS work_queue,
               CAST(:prefix AS text) || '-run-' || (g / 10) AS run_name
        FROM generate_series(CAST(:first AS bigint), CAST(:first AS bigint) + CAST(:size AS bigint) - 1) AS g
    ) AS numbered
    """,
    """
    INSERT INTO events (id, created, updated, occurred, event, resource_id, resource, related_resource_ids,
                        related, payload, received, recorded)
    SELECT id, occurred, occurred, occurred,
           CASE WHEN kind = 0 THEN 'prefect.flow-run.Pending' WHEN kind = 1 THEN 'prefect.flow-run.Running'
                WHEN kind = 2 THEN 'prefect.flow-run.Completed' WHEN kind < 6 THEN 'prefect.flow-run.heartbeat'
                WHEN kind % 2 = 0 THEN 'prefect.task-run.Running' ELSE 'prefect.task-run.Completed' END,
           resource_id, resource,
           (SELECT jsonb_agg(related_resource ->> 'prefect.resource.id') FROM jsonb_array_elements(related)
                AS related_resource),
           related,
           CASE WHEN kind BETWEEN 3 AND 5 THEN '{}'::jsonb
                ELSE jsonb_build_object(
                    'intended', jsonb_build_object('from', 'PENDING', 'to', 'RUNNING'),
                    'initial_state', jsonb_build_object('type', 'PENDING', 'name', 'Pending'),
                    'validated_state', jsonb_build_object('type', 'RUNNING', 'name', 'Running', 'message', '',
                                                          'state_details', jsonb_build_object('pause_reschedule', false)))
           END,
           occurred, occurred
    FROM event_chunk
    """,
    """
    INSERT INTO event_resources (id, created, updated, occurred, resource_id, resource_role, resource, event_id)
    SELECT gen_random_uuid(), occurred, occurred, occurred, resource_id, '', resource, id FROM event_chunk
    UNION ALL
    SELECT gen_random_uuid(), c.occurred, c.occurred, c.occurred, related_resource ->> 'prefect.resource.id',
           related_resource ->> 'prefect.resource.role', related_resource, c.id
    FROM event_chunk AS c CROSS JOIN LATERAL jsonb_array_elements(c.related) AS related_resource
    """,
)

# One chunk of log lines, ten per flow run, spread over the window like events.
_LOG_CHUNK = """
INSERT INTO log (id, created, updated, name, level, flow_run_id, task_run_id, message, timestamp)
SELECT gen_random_uuid(), moment, moment, 'prefect.flow_runs', 20,
       md5(CAST(:prefix AS text) || '-run-' || (g / 10))::uuid, NULL,
       'Flow run ' || (g / 10) || ' line ' || (g % 10) || ': beginning, doing and ending its work', moment
FROM generate_series(CAST(:first AS bigint), CAST(:first AS bigint) + CAST(:size AS bigint) - 1) AS g,
     LATERAL (SELECT CAST(:low AS timestamptz)
                     + make_interval(secs => CAST(:span AS float8) * g / CAST(:total AS bigint)) AS moment) AS m
"""


@dataclass(frozen=True)
class EventWindow:
    """One time window of the database: `kept` or a method's slice."""

    name: str
    low: datetime
    high: datetime
    events: int

    def older_than_days(self, now: datetime | None = None) -> float:
        """The age that selects this window once every older window is gone: its upper edge."""
        return ((now or datetime.now(UTC)) - self.high) / timedelta(days=1)


def _slow(database_url: str):
    return connect(database_url, statement_timeout_seconds=SLOW_STATEMENT_TIMEOUT_SECONDS)


async def _anchor(connection: AsyncConnection) -> datetime:
    for statement in _RECORDS.split(";"):
        await connection.execute(text(statement))
    anchor = (await connection.execute(text("SELECT anchor FROM bench.event_anchor"))).scalar()
    if anchor is None:
        anchor = datetime.now(UTC)
        await connection.execute(text("INSERT INTO bench.event_anchor VALUES (:anchor)"), {"anchor": anchor})
    await connection.commit()
    return anchor


def window_bounds(anchor: datetime, name: str, methods: tuple[str, ...]) -> tuple[datetime, datetime]:
    """Where a window lies: `kept` just before the anchor, methods further back, the first oldest."""
    if name == KEPT:
        return anchor - KEPT_WINDOW[1], anchor - KEPT_WINDOW[0]
    newest_first = tuple(reversed(methods))
    step = SLICE_WINDOW + SLICE_GAP
    high = anchor - KEPT_WINDOW[1] - SLICE_GAP - newest_first.index(name) * step
    return high - SLICE_WINDOW, high


@asynccontextmanager
async def bulk_loading(database_url: str) -> AsyncIterator[None]:
    """Checkpoints further apart while seeding (at the default, every 1 GB of WAL, full-page
    images are most of a load); back to the server's setting after, so methods are measured at it."""
    await _configure(database_url, f"ALTER SYSTEM SET max_wal_size = '{BULK_LOAD_MAX_WAL_SIZE}'")
    try:
        yield
    finally:
        await _configure(database_url, "ALTER SYSTEM RESET max_wal_size")


async def _configure(database_url: str, statement: str) -> None:
    async with _slow(database_url) as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(text(statement))
        await autocommit.execute(text("SELECT pg_reload_conf()"))


async def disk_allows(connection: AsyncConnection) -> bool:
    """Whether the database's disk has more than the reserve left; says so when not."""
    data_directory = (await connection.execute(text("SHOW data_directory"))).scalar_one()
    free = shutil.disk_usage(data_directory).free
    if free > DISK_RESERVE_BYTES:
        return True
    log.warning(
        "seeding stopped: %.1f GB left on the disk, the reserve is %.0f GB",
        free / 2**30,
        DISK_RESERVE_BYTES / 2**30,
    )
    return False


async def _seed_events(
    connection: AsyncConnection, prefix: str, low: datetime, high: datetime, events: int
) -> int:
    """`events` events spread evenly over [low, high), in chunks, each committed with a progress line;
    how many were written (fewer when the disk ran short)."""
    started = time.perf_counter()
    for first in range(0, events, SEED_CHUNK_EVENTS):
        if not await disk_allows(connection):
            return first
        parameters = {
            "first": first,
            "size": min(SEED_CHUNK_EVENTS, events - first),
            "total": events,
            "low": low,
            "span": (high - low).total_seconds(),
            "prefix": prefix,
        }
        for statement in _EVENT_CHUNK:
            await connection.execute(text(statement), parameters)
        await connection.commit()
        done = first + parameters["size"]
        log.info(
            "seeded %s of %s events (%s) in %.0f s",
            f"{done:,}",
            f"{events:,}",
            prefix,
            time.perf_counter() - started,
        )
    return events


async def ensure_events(
    database_url: str, kept: int, slices: dict[str, int], methods: tuple[str, ...]
) -> dict[str, EventWindow]:
    """`kept` events at least in the kept window, and exactly `slices[name]` in each method's window."""
    windows = {}
    async with bulk_loading(database_url), _slow(database_url) as connection:
        anchor = await _anchor(connection)
        # The methods' windows first: when the disk runs short, it is the kept bulk that is smaller.
        for name, wanted in [*slices.items(), (KEPT, kept)]:
            low, high = window_bounds(anchor, name, methods)
            present = await _events_between(connection, low, high)
            if name != KEPT and (
                present != wanted
                or await _resources_between(connection, low, high) != seeded_resources(present)
            ):
                # What an interrupted run left of the window (Prefect's vacuum deletes
                # resources before their events): start the window over.
                await _delete_between(connection, low, high)
                present = 0
            missing = max(0, wanted - present)
            # Nothing held while indexes are dropped and built on other connections.
            await connection.commit()
            if missing:
                # A new prefix per top-up: each top-up writes flow runs of its own.
                prefix = f"bench-{name.replace('_', '-')}-{time.time_ns()}"
                async with _indexes_built_after(database_url, EVENT_TABLES, missing):
                    missing = await _seed_events(connection, prefix, low, high, missing)
            windows[name] = EventWindow(name, low, high, present + missing)
    return windows


@asynccontextmanager
async def _indexes_built_after(database_url: str, tables: tuple[str, ...], rows: int) -> AsyncIterator[None]:
    """For a big load, the tables' indexes (primary keys included: none of these tables is
    referenced) dropped before and built again after: building an index once is many times
    faster than growing it row by row, above all the GIN indexes of `events` and the random
    uuids of the primary keys."""
    if rows < BULK_LOAD_ROWS:
        yield
        return
    async with _slow(database_url) as connection:
        names = await connection.execute(
            text("SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename = ANY(:tables)"),
            {"tables": list(tables)},
        )
        names = list(names.scalars())
    await drop_indexes(database_url, names)
    try:
        yield
    finally:
        await restore_indexes(database_url)


# What builds an index of Prefect's tables again: its definition, or for a primary key the
# constraint that owns it.
_DEFINITION = """
SELECT coalesce(
    (SELECT format('ALTER TABLE %s ADD CONSTRAINT %I %s', c.conrelid::regclass, c.conname, pg_get_constraintdef(c.oid))
     FROM pg_constraint AS c WHERE c.conindid = i.indexrelid AND c.contype = 'p'),
    pg_get_indexdef(i.indexrelid))
FROM pg_index AS i JOIN pg_class AS index_class ON index_class.oid = i.indexrelid
JOIN pg_namespace AS n ON n.oid = index_class.relnamespace
WHERE n.nspname = 'public' AND index_class.relname = :name
"""


async def drop_indexes(database_url: str, names: Iterable[str]) -> None:
    """Drop these indexes of Prefect's tables, their definitions kept for `restore_indexes`."""
    async with _slow(database_url) as connection:
        await _anchor(connection)
        for name in names:
            definition = (await connection.execute(text(_DEFINITION), {"name": name})).scalar()
            if definition is None:
                continue
            await connection.execute(
                text(
                    "INSERT INTO bench.dropped_index VALUES (:name, :definition) ON CONFLICT (name) DO NOTHING"
                ),
                {"name": name, "definition": definition},
            )
            if definition.startswith("ALTER TABLE"):
                table = definition.split()[2]
                await connection.execute(text(f"ALTER TABLE {table} DROP CONSTRAINT {name}"))
            else:
                await connection.execute(text(f"DROP INDEX {name}"))
        await connection.commit()


async def restore_indexes(database_url: str) -> None:
    """Build every index `drop_indexes` dropped (an interrupted run may have left some dropped)."""
    async with _slow(database_url) as connection:
        await _anchor(connection)
        await connection.execute(text(f"SET maintenance_work_mem = '{INDEX_BUILD_MEMORY}'"))
        dropped = (await connection.execute(text("SELECT name, definition FROM bench.dropped_index"))).all()
        for name, definition in dropped:
            started = time.perf_counter()
            await connection.execute(
                text(definition.replace("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ", 1))
            )
            await connection.execute(
                text("DELETE FROM bench.dropped_index WHERE name = :name"), {"name": name}
            )
            await connection.commit()
            log.info("index %s built in %.0f s", name, time.perf_counter() - started)


async def ensure_logs(database_url: str, table: str, lines: int) -> int:
    """At least `lines` log lines in `table` (`log`, or a copy of its definition), ten per flow run."""
    async with bulk_loading(database_url), _slow(database_url) as connection:
        anchor = await _anchor(connection)
        await connection.execute(text(f"CREATE TABLE IF NOT EXISTS {table} (LIKE public.log INCLUDING ALL)"))
        recorded = text("SELECT lines FROM bench.log_seed WHERE name = :table")
        seeded = (await connection.execute(recorded, {"table": table})).scalar() or 0
        await connection.commit()
        async with _indexes_built_after(database_url, (table.rpartition(".")[2],), lines - seeded):
            return await _seed_log_chunks(connection, table, seeded, lines, anchor)


async def _seed_log_chunks(
    connection: AsyncConnection, table: str, seeded: int, lines: int, anchor: datetime
) -> int:
    """Lines `seeded` to `lines` of `table`, a committed chunk at a time; how many there are then."""
    started = time.perf_counter()
    for first in range(seeded, lines, SEED_CHUNK_LOGS):
        if not await disk_allows(connection):
            return first
        size = min(SEED_CHUNK_LOGS, lines - first)
        await _seed_logs(connection, table, f"bench-{table}", first, size, anchor)
        await connection.execute(
            text(
                """
                INSERT INTO bench.log_seed (name, lines) VALUES (:table, :lines)
                ON CONFLICT (name) DO UPDATE SET lines = :lines
                """
            ),
            {"table": table, "lines": first + size},
        )
        await connection.commit()
        log.info(
            "seeded %s of %s log lines in %s in %.0f s",
            f"{first + size:,}",
            f"{lines:,}",
            table,
            time.perf_counter() - started,
        )
    return max(seeded, lines)


async def seed_log_slice(database_url: str, table: str, runs: int) -> list[UUID]:
    """The log lines of `runs` flow runs to be deleted, appended to `table`; their flow run ids."""
    flow_run_ids = [_md5_uuid(f"{LOG_SLICE_PREFIX}-run-{number}") for number in range(runs)]
    async with _slow(database_url) as connection:
        anchor = await _anchor(connection)
        # What an interrupted run left of the slice.
        await connection.execute(
            text(f"DELETE FROM {table} WHERE flow_run_id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": [str(flow_run_id) for flow_run_id in flow_run_ids]},
        )
        await _seed_logs(connection, table, LOG_SLICE_PREFIX, 0, runs * LOGS_PER_RUN, anchor)
        await connection.commit()
    return flow_run_ids


async def _seed_logs(
    connection: AsyncConnection, table: str, prefix: str, first: int, size: int, anchor: datetime
) -> None:
    low, high = anchor - KEPT_WINDOW[1], anchor - KEPT_WINDOW[0]
    parameters = {
        "first": first,
        "size": size,
        "total": first + size,
        "low": low,
        "span": (high - low).total_seconds(),
        "prefix": prefix,
    }
    await connection.execute(
        text(_LOG_CHUNK.replace("INSERT INTO log ", f"INSERT INTO {table} ")), parameters
    )


def _md5_uuid(value: str) -> UUID:
    """PostgreSQL's `md5(value)::uuid`."""
    return UUID(hashlib.md5(value.encode()).hexdigest())


async def _events_between(connection: AsyncConnection, low: datetime, high: datetime) -> int:
    statement = text("SELECT count(*) FROM events WHERE occurred >= :low AND occurred < :high")
    return (await connection.execute(statement, {"low": low, "high": high})).scalar_one()


def seeded_resources(events: int) -> int:
    """The resource rows `_seed_events` writes for `events` events: each event's own, and three
    related ones for the flow run's three state changes of every ten events, two for the others."""
    runs, rest = divmod(events, EVENTS_PER_RUN)
    return 3 * events + 3 * runs + min(rest, 3)


async def _resources_between(connection: AsyncConnection, low: datetime, high: datetime) -> int:
    statement = text("SELECT count(*) FROM event_resources WHERE occurred >= :low AND occurred < :high")
    return (await connection.execute(statement, {"low": low, "high": high})).scalar_one()


async def _delete_between(connection: AsyncConnection, low: datetime, high: datetime) -> None:
    for table in ("event_resources", "events"):
        await connection.execute(
            text(f"DELETE FROM {table} WHERE occurred >= :low AND occurred < :high"),
            {"low": low, "high": high},
        )
    await connection.commit()


@dataclass(frozen=True)
class WindowCount:
    events: int
    event_resources: int

    @property
    def rows(self) -> int:
        return self.events + self.event_resources


async def count_window(database_url: str, window: EventWindow) -> WindowCount:
    """Events and resource rows in the window (a sequential scan of event_resources on a 3.4 schema)."""
    async with _slow(database_url) as connection:
        counts = []
        for table in ("events", "event_resources"):
            statement = text(f"SELECT count(*) FROM {table} WHERE occurred >= :low AND occurred < :high")
            counts.append(
                (await connection.execute(statement, {"low": window.low, "high": window.high})).scalar_one()
            )
    return WindowCount(*counts)


async def table_sizes(database_url: str, tables: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Rows (estimated, from the statistics) and gigabytes on disk, indexes included, per table."""
    async with _slow(database_url) as connection:
        sizes = {}
        for table in tables:
            row = (
                await connection.execute(
                    text(
                        "SELECT reltuples::bigint, pg_total_relation_size(oid) FROM pg_class WHERE oid = to_regclass(:table)"
                    ),
                    {"table": table},
                )
            ).one()
            sizes[table] = {"rows_estimated": max(int(row[0]), 0), "gigabytes": round(row[1] / 2**30, 2)}
    return sizes
