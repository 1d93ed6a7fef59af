"""The SQL engine's event and orphan batches on a Prefect 3.4 schema, which lacks the 3.7/3.8
indexes on `event_resources` (`occurred`, `event_id`).

A real 3.4.25 server's database is filled the way Prefect writes it (an event, one resource
row per resource with the event's `occurred`), big enough that the planner's choice means
something; every statement the engine sends while it deletes old events and orphans is
EXPLAINed with its own parameters just before it runs: none may read events, event_resources
or log with a sequential scan. The timings of one batch's resource delete, the old way (by
`event_id`) and the engine's way, on this schema and once the 3.8 index exists, are printed.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import sqlalchemy as sa
from history import DeadlineAfterChecks, database_of
from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.retention.parameters import RetentionParameters
from tasks.retention.purge import event_rules
from tasks.retention.rate_limit import Deadline
from tasks.retention.sql_database import EVENT_RESOURCES, EVENTS, PrefectDatabase
from tasks.retention.sql_housekeeping import HOUSEKEEPING_BATCH_ROWS, SqlHousekeeping

EVENT_COUNT = 300_000  # one every 2.4 s over 8.3 days, one in ten a heartbeat
ORPHAN_RESOURCES = 20_000  # old rows whose event is gone
LOGS = 500_000  # ten per run of 50,000 runs that no longer exist
RUNLESS_LOGS = 100_000  # logs of no flow run, which stay
SEQUENTIAL_SCAN = re.compile(r"Seq Scan on (events|event_resources|log)\b")

SEED_SQL = f"""
INSERT INTO events (id, created, updated, occurred, event, resource_id, resource, related_resource_ids, related,
                    payload, received, recorded)
SELECT gen_random_uuid(), moment, moment, moment,
       CASE WHEN g % 10 = 0 THEN 'prefect.flow-run.heartbeat' ELSE 'prefect.flow-run.Running' END,
       'prefect.flow-run.' || (g / 10), jsonb_build_object('prefect.resource.id', 'prefect.flow-run.' || (g / 10)),
       jsonb_build_array('prefect.flow.' || (g % 40), 'prefect.deployment.' || (g % 200)),
       jsonb_build_array(
           jsonb_build_object('prefect.resource.id', 'prefect.flow.' || (g % 40), 'prefect.resource.role', 'flow'),
           jsonb_build_object('prefect.resource.id', 'prefect.deployment.' || (g % 200),
                              'prefect.resource.role', 'deployment')),
       '{{}}', moment, moment
FROM generate_series(1, {EVENT_COUNT}) AS g, LATERAL (SELECT now() - make_interval(secs => g * 2.4) AS moment) AS m;

INSERT INTO event_resources (id, created, updated, occurred, resource_id, resource_role, resource, event_id)
SELECT gen_random_uuid(), e.recorded, e.recorded, e.occurred, r.resource_id, r.role, '{{}}', e.id
FROM events AS e
CROSS JOIN LATERAL (VALUES (e.resource_id, ''), (e.related_resource_ids ->> 0, 'flow'),
                           (e.related_resource_ids ->> 1, 'deployment')) AS r(resource_id, role);

INSERT INTO event_resources (id, created, updated, occurred, resource_id, resource_role, resource, event_id)
SELECT gen_random_uuid(), moment, moment, moment, 'prefect.flow.gone', 'flow', '{{}}', gen_random_uuid()
FROM generate_series(1, {ORPHAN_RESOURCES}) AS g,
     LATERAL (SELECT now() - interval '8 days' - make_interval(secs => g * 10) AS moment) AS m;

INSERT INTO log (id, created, updated, name, level, flow_run_id, message, timestamp)
SELECT gen_random_uuid(), now(), now(), 'prefect.flow_runs', 20, run.id, 'a line', now()
FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, {LOGS // 10})) AS run, generate_series(1, 10);

INSERT INTO log (id, created, updated, name, level, flow_run_id, message, timestamp)
SELECT gen_random_uuid(), now(), now(), 'prefect.task_runs', 20, NULL, 'a line', now()
FROM generate_series(1, {RUNLESS_LOGS});

ANALYZE events, event_resources, log;
"""


class PlanWatch:
    """EXPLAINs every statement sent to the database, with its own parameters, just before it runs."""

    def __init__(self) -> None:
        self.plans: list[tuple[str, str]] = []

    async def watch(self, database: PrefectDatabase) -> PlanWatch:
        """Watch every connection of the database's pool (the events are the pool's engine's)."""
        async with database.connect() as connection:
            sa.event.listen(connection.sync_engine, "before_cursor_execute", self._explain)
        return self

    def _explain(self, connection, cursor, statement, parameters, context, executemany) -> None:
        if not re.search(r"\b(events|event_resources|log)\b", statement):
            return
        explaining = connection.connection.cursor()
        explaining.execute(f"EXPLAIN {statement}", parameters)
        self.plans.append((statement, "\n".join(row[0] for row in explaining.fetchall())))

    def sequential_scans(self) -> list[str]:
        return [f"{statement}\n{plan}" for statement, plan in self.plans if SEQUENTIAL_SCAN.search(plan)]


class RolledBackDatabase(PrefectDatabase):
    """Prefect's database whose every transaction is rolled back at its end: the engine's
    batches run as they do, and leave the database as it was."""

    @asynccontextmanager
    async def transaction(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        async with self.connect() as connection:
            yield connection
            await connection.rollback()


async def timed_batch(url: str, now: datetime) -> tuple[dict[str, float], str]:
    """Milliseconds of one batch (selected, then its resources and events deleted) by `event_id`
    and the way a new engine deletes it, each rolled back; and the plan of the delete by `event_id`."""
    database = RolledBackDatabase(url)
    rule = next(rule for rule in event_rules(RetentionParameters(), now) if rule.event is None)
    timings = {}
    try:
        async with database.connect() as connection:
            started = time.perf_counter()
            oldest = sa.select(EVENTS.c.id).where(rule.condition()).order_by(EVENTS.c.occurred, EVENTS.c.id)
            event_ids = list((await connection.execute(oldest.limit(HOUSEKEEPING_BATCH_ROWS))).scalars())
            assert len(event_ids) == HOUSEKEEPING_BATCH_ROWS
            by_event_id = sa.delete(EVENT_RESOURCES).where(
                database.among(EVENT_RESOURCES.c.event_id, event_ids)
            )
            deleted = (await connection.execute(by_event_id)).rowcount
            await connection.execute(sa.delete(EVENTS).where(database.among(EVENTS.c.id, event_ids)))
            timings["by event_id"] = round((time.perf_counter() - started) * 1000, 1)
            assert deleted == 3 * HOUSEKEEPING_BATCH_ROWS
            await connection.rollback()
            compiled = by_event_id.compile(dialect=connection.dialect)
            explained = await connection.exec_driver_sql(
                f"EXPLAIN {compiled}", tuple(compiled.params[name] for name in compiled.positiontup)
            )
            plan = "\n".join(row[0] for row in explained)
            await connection.rollback()
        started = time.perf_counter()
        # One batch, then the deadline has passed.
        found = await SqlHousekeeping(database).delete_old_events(
            [rule], DeadlineAfterChecks(1), dry_run=False
        )
        timings["the engine's way"] = round((time.perf_counter() - started) * 1000, 1)
        assert found == {"events": HOUSEKEEPING_BATCH_ROWS, "event_resources": 3 * HOUSEKEEPING_BATCH_ROWS}
    finally:
        await database.dispose()
    return timings, plan


async def test_event_and_orphan_batches_use_indexes_a_3_4_schema_has(stack, fresh_server):
    server = fresh_server(version="3.4.25")
    database = database_of(server)
    stack.postgres.psql(SEED_SQL, database=database)
    now = datetime.now(UTC)
    rules = event_rules(RetentionParameters(), now)
    heartbeats, other_events = rules
    expected_events = sum(
        int(stack.postgres.psql(f"SELECT count(*) FROM events WHERE {condition}", database=database))
        for condition in (
            f"event = 'prefect.flow-run.heartbeat' AND occurred < '{heartbeats.older_than.isoformat()}'",
            f"event <> 'prefect.flow-run.heartbeat' AND occurred < '{other_events.older_than.isoformat()}'",
        )
    )
    index_of_3_8 = "ix_event_resources__event_id ON event_resources (event_id)"
    timings, by_event_id_plan = await timed_batch(server.database_url, now)
    # Big enough for the planner to matter: deleting by event_id reads the whole table here.
    assert "Seq Scan on event_resources" in by_event_id_plan
    stack.postgres.psql(f"CREATE INDEX CONCURRENTLY {index_of_3_8}", database=database)
    timings = {"3.4 schema": timings, "with the 3.8 index": (await timed_batch(server.database_url, now))[0]}
    stack.postgres.psql("DROP INDEX CONCURRENTLY ix_event_resources__event_id", database=database)

    prefect_database = PrefectDatabase(server.database_url)
    housekeeping = SqlHousekeeping(prefect_database)
    try:
        watch = await PlanWatch().watch(prefect_database)
        dry = await housekeeping.delete_old_events(rules, Deadline(None), dry_run=True)
        deleted = await housekeeping.delete_old_events(rules, Deadline(None), dry_run=False)
        orphans = await housekeeping.sweep_orphans(Deadline(None), dry_run=False)
    finally:
        await prefect_database.dispose()
    print(f"\nOne batch of {HOUSEKEEPING_BATCH_ROWS} events and their resources deleted, ms: {timings}")

    assert len(watch.plans) > 50
    assert watch.sequential_scans() == []
    assert dry == {"events": expected_events, "event_resources": 3 * expected_events}
    assert deleted == {"events": expected_events, "event_resources": 3 * expected_events + ORPHAN_RESOURCES}
    assert orphans["log"] == LOGS
    left = stack.postgres.psql(
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM event_resources), "
        "(SELECT count(*) FROM event_resources AS r WHERE NOT EXISTS "
        "(SELECT FROM events AS e WHERE e.id = r.event_id)), (SELECT count(*) FROM log)",
        database=database,
    ).strip()
    assert left == f"{EVENT_COUNT - expected_events}|{3 * (EVENT_COUNT - expected_events)}|0|{RUNLESS_LOGS}"
