"""The SQL engine's housekeeping: what retention deletes in Prefect's database besides the
expired runs' trees.

Part of the SQL engine (`sql_engine` opens it and hands it out as its `housekeeping`): the
SQL engine's modules are the only ones in the project that write to Prefect's tables.
- old events: `event_resources`, then `events`, past their retention age (heartbeats may
  have their own); on partitioned event tables, whole partitions past the age first
  (`sql_partitions`);
- orphans: logs, artifacts, artifact collections and task run cache rows whose run (or
  artifact, or state) no longer exists, left by runs deleted elsewhere;
- `VACUUM (ANALYZE)` of the tables rows were deleted from (SQLite: `ANALYZE` only);
- for the API engine, which has no route for them, the logs and cache rows of the runs it
  deleted, by their ids.
Events and orphans go in bounded batches, each its own short transaction, driven by
indexes every Prefect 3 schema has (a 3.4 schema lacks the 3.7 and 3.8 indexes on
event_resources). It never touches a run, a state or a task run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import sqlalchemy as sa
from prefect.server.utilities.database import UUID as PrefectUuid
from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.database import connect
from tasks.retention.rate_limit import Deadline
from tasks.retention.sql_database import (
    ARTIFACT,
    ARTIFACT_COLLECTION,
    EVENT_RESOURCES,
    EVENTS,
    FLOW_RUN,
    LOG,
    NIL_UUID,
    TABLES,
    TASK_RUN_STATE,
    TASK_RUN_STATE_CACHE,
    PrefectDatabase,
)
from tasks.retention.sql_partitions import PartitionDrops, drop_old_partitions

# Deleting these rows deletes their children through ON DELETE CASCADE; VACUUM needs both.
CASCADES_TO = {"flow_run": ("flow_run_state", "flow_run_input"), "task_run": ("task_run_state",)}
# Events and orphans: rows per housekeeping transaction.
HOUSEKEEPING_BATCH_ROWS = 5_000
# VACUUM of a big table can take minutes; it blocks no reader or writer.
VACUUM_TIMEOUT_SECONDS = 3_600.0
EVENT_ID_INDEX_SQL = """
SELECT EXISTS (
    SELECT FROM pg_index AS i
    JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    WHERE i.indrelid = to_regclass('event_resources') AND a.attname = 'event_id' AND i.indisvalid
)
"""


@dataclass(frozen=True)
class EventRetention:
    """Events older than `older_than`: only those named `event` when set, all but `except_event` otherwise."""

    older_than: datetime
    event: str | None = None
    except_event: str | None = None

    def condition(self) -> sa.ColumnElement[bool]:
        conditions = [EVENTS.c.occurred < self.older_than]
        if self.event is not None:
            conditions.append(EVENTS.c.event == self.event)
        if self.except_event is not None:
            conditions.append(EVENTS.c.event != self.except_event)
        return sa.and_(*conditions)


def whole_cutoff(rules: Sequence[EventRetention]) -> datetime | None:
    """The time before which the rules delete every event, whatever its name: a rule for all
    events, or a rule for one name beside a rule for all the others (the earlier of their
    two); None when no time has that (a rule for heartbeats alone)."""
    cutoffs = [rule.older_than for rule in rules if rule.event is None and rule.except_event is None]
    cutoffs += [
        min(named.older_than, others.older_than)
        for named in rules
        for others in rules
        if named.event is not None and others.except_event == named.event
    ]
    return max(cutoffs) if cutoffs else None


@dataclass(frozen=True)
class OrphanSweep:
    """Rows of `table` whose `reference` points at a `target` row that no longer exists.

    `walk="by_reference"` steps through the distinct values of an indexed `reference`
    column one index probe at a time; `walk="by_id"` pages through the table's primary key
    (for references without an index). Either way each transaction reads a bounded slice.
    """

    table: sa.Table
    reference: sa.Column
    target: sa.Column
    walk: Literal["by_reference", "by_id"]


ORPHAN_SWEEPS = (
    OrphanSweep(LOG, LOG.c.flow_run_id, FLOW_RUN.c.id, "by_reference"),
    OrphanSweep(ARTIFACT, ARTIFACT.c.flow_run_id, FLOW_RUN.c.id, "by_reference"),
    OrphanSweep(TASK_RUN_STATE_CACHE, TASK_RUN_STATE_CACHE.c.task_run_state_id, TASK_RUN_STATE.c.id, "by_id"),
    OrphanSweep(ARTIFACT_COLLECTION, ARTIFACT_COLLECTION.c.latest_id, ARTIFACT.c.id, "by_id"),
)


class SqlHousekeeping:
    """Events, orphans, VACUUM and the API engine's leftovers, on the SQL engine's database."""

    def __init__(self, database: PrefectDatabase) -> None:
        self._database = database
        # Whether event_resources has an index on event_id (Prefect 3.8's migration adds it).
        self._resources_indexed_by_event: bool | None = None

    # Events ----------------------------------------------------------------------------

    async def drop_old_partitions(self, rules: Sequence[EventRetention], *, dry_run: bool) -> PartitionDrops:
        """Partitioned event tables: every partition all of whose rows the rules delete, whole."""
        return await drop_old_partitions(self._database, whole_cutoff(rules), dry_run=dry_run)

    async def delete_old_events(
        self,
        rules: Iterable[EventRetention],
        deadline: Deadline,
        *,
        dry_run: bool,
        dropped_up_to: datetime | None = None,
    ) -> dict[str, int]:
        """Each rule in turn, a batch of events at a time, oldest first: their resources, then the events.

        Batches walk `(occurred, id)` (an index every Prefect 3 schema has, alone or after
        `event`), a keyset page at a time, so a dry run counts the very batches a real run
        deletes and no batch re-reads what the previous one left. A dry run's walk starts at
        `dropped_up_to`, where the partitions a real run drops whole end (a real run finds
        those rows gone).
        """
        found: Counter[str] = Counter()
        for rule in rules:
            after = (dropped_up_to, NIL_UUID) if dry_run and dropped_up_to is not None else None
            while not deadline.passed:
                async with self._database.transaction(write=not dry_run) as connection:
                    by_resource = not await self._resources_have_event_index(connection)
                    batch = (await connection.execute(self._next_events(rule, after, by_resource))).all()
                    if not batch:
                        break
                    after = (batch[-1].occurred, batch[-1].id)
                    found.update(await self._remove_events(connection, batch, dry_run=dry_run))
                if len(batch) < HOUSEKEEPING_BATCH_ROWS:
                    break
            if rule.event is None and not dry_run:
                # Resources whose event someone else already deleted. `updated` (when the row
                # was written) is indexed in every Prefect 3 schema, `occurred` only from 3.7.5;
                # a resource written after the cutoff goes once the cutoff passes its `updated`.
                found["event_resources"] += await self._delete_in_batches(
                    EVENT_RESOURCES,
                    sa.and_(
                        EVENT_RESOURCES.c.updated < rule.older_than,
                        EVENT_RESOURCES.c.occurred < rule.older_than,
                    ),
                    EVENT_RESOURCES.c.updated,
                    deadline,
                )
        return dict(found)

    def _next_events(
        self, rule: EventRetention, after: tuple[datetime, UUID] | None, by_resource: bool
    ) -> sa.Select:
        """The next batch of events; with their resource ids only when those find their resource
        rows (decoding every event's related ids was a third of a batch's time when unused)."""
        conditions = [rule.condition()]
        if after is not None:
            conditions += [
                EVENTS.c.occurred >= after[0],
                sa.or_(EVENTS.c.occurred > after[0], EVENTS.c.id > after[1]),
            ]
        columns = [EVENTS.c.id, EVENTS.c.occurred]
        if by_resource:
            columns += [EVENTS.c.resource_id, EVENTS.c.related_resource_ids]
        return (
            sa.select(*columns)
            .where(*conditions)
            .order_by(EVENTS.c.occurred, EVENTS.c.id)
            .limit(HOUSEKEEPING_BATCH_ROWS)
        )

    async def _remove_events(
        self, connection: AsyncConnection, batch: Sequence[Any], *, dry_run: bool
    ) -> Counter[str]:
        """Delete (or count) a batch of events (oldest first) and their resources."""
        event_ids = [event.id for event in batch]
        resources = self._database.among(EVENT_RESOURCES.c.event_id, event_ids)
        if not await self._resources_have_event_index(connection):
            # Without an event_id index (before 3.8) a delete by event_id scans the whole table
            # every batch (measured on a 3.4 schema, 6M rows: 614 ms a batch against 43 ms
            # with the index, and growing with the table). Prefect writes one row per resource
            # of an event (its own and each related one) with the event's `occurred`, so the
            # batch's resource ids and time span find its rows through
            # `ix_event_resources__resource_id__occurred`, which every Prefect 3 schema has
            # (a row written otherwise is left to the sweep of resources whose event is gone).
            resource_ids = {event.resource_id for event in batch}
            resource_ids.update(related for event in batch for related in event.related_resource_ids or ())
            resources = sa.and_(
                self._database.among_unestimated(EVENT_RESOURCES.c.resource_id, resource_ids),
                EVENT_RESOURCES.c.occurred >= batch[0].occurred,
                EVENT_RESOURCES.c.occurred <= batch[-1].occurred,
                resources,
            )
        if dry_run:
            counted = await connection.execute(
                sa.select(sa.func.count()).select_from(EVENT_RESOURCES).where(resources)
            )
            return Counter({"event_resources": counted.scalar_one(), "events": len(event_ids)})
        resources_deleted = (await connection.execute(sa.delete(EVENT_RESOURCES).where(resources))).rowcount
        events_deleted = (
            await connection.execute(sa.delete(EVENTS).where(self._database.among(EVENTS.c.id, event_ids)))
        ).rowcount
        return Counter({"event_resources": resources_deleted, "events": events_deleted})

    async def _resources_have_event_index(self, connection: AsyncConnection) -> bool:
        """A valid PostgreSQL index led by event_resources.event_id; SQLite always goes by resource."""
        if self._resources_indexed_by_event is None:
            self._resources_indexed_by_event = self._database.dialect == "postgresql" and bool(
                (await connection.execute(sa.text(EVENT_ID_INDEX_SQL))).scalar()
            )
        return self._resources_indexed_by_event

    async def _delete_in_batches(
        self,
        table: sa.Table,
        condition: sa.ColumnElement[bool],
        walk: sa.ColumnElement[Any],
        deadline: Deadline,
    ) -> int:
        """Delete `table`'s rows matching `condition`, a batch at a time along the indexed `walk`
        column: in index order, a batch never reads the whole table, whatever the estimates."""
        total = 0
        while not deadline.passed:
            async with self._database.transaction(write=True) as connection:
                batch = sa.select(table.c.id).where(condition).order_by(walk).limit(HOUSEKEEPING_BATCH_ROWS)
                # `IN (subquery)` was planned as a hash join over a sequential scan of the table.
                deleted = sa.delete(table).where(self._database.among_subquery(table.c.id, batch))
                count = (await connection.execute(deleted)).rowcount
            total += count
            if count < HOUSEKEEPING_BATCH_ROWS:
                break
        return total

    # Orphans ---------------------------------------------------------------------------

    async def sweep_orphans(self, deadline: Deadline, *, dry_run: bool) -> dict[str, int]:
        """Rows left behind by runs deleted elsewhere (the API, `db_vacuum`, an interrupted job)."""
        found: Counter[str] = Counter()
        for sweep in ORPHAN_SWEEPS:
            after = NIL_UUID
            while not deadline.passed:
                async with self._database.transaction(write=not dry_run) as connection:
                    pairs = await self._next_slice(connection, sweep, after)
                    if not pairs:
                        break
                    after = pairs[-1][0]
                    references = {reference for _, reference in pairs if reference is not None}
                    existing = set(
                        (
                            await connection.execute(
                                sa.select(sweep.target).where(self._database.among(sweep.target, references))
                            )
                        ).scalars()
                    )
                    orphaned = [key for key, reference in pairs if reference not in existing]
                    if orphaned:
                        found.update(await self._remove_orphans(connection, sweep, orphaned, dry_run=dry_run))
        return dict(found)

    async def _next_slice(
        self, connection: AsyncConnection, sweep: OrphanSweep, after: UUID
    ) -> list[tuple[UUID, UUID | None]]:
        """The next (walk key, reference) pairs after `after`, at most one batch of them."""
        if sweep.walk == "by_id":
            rows = await connection.execute(
                sa.select(sweep.table.c.id, sweep.reference)
                .where(sweep.table.c.id > after)
                .order_by(sweep.table.c.id)
                .limit(HOUSEKEEPING_BATCH_ROWS)
            )
            return [(row[0], row[1]) for row in rows]
        # A loose index scan: one index probe per distinct value instead of reading every row.
        table, column = sweep.table.name, sweep.reference.name
        statement = sa.text(
            f"""
            WITH RECURSIVE owners(value, position) AS (
                SELECT (SELECT {column} FROM {table} WHERE {column} > :after ORDER BY {column} LIMIT 1), 1
                UNION ALL
                SELECT (SELECT {column} FROM {table} WHERE {column} > owners.value ORDER BY {column} LIMIT 1),
                       owners.position + 1
                FROM owners WHERE owners.value IS NOT NULL AND owners.position < :limit
            )
            SELECT value FROM owners WHERE value IS NOT NULL
            """
        ).bindparams(sa.bindparam("after", type_=PrefectUuid()), sa.bindparam("limit", type_=sa.Integer()))
        rows = await connection.execute(
            statement.columns(value=PrefectUuid()), {"after": after, "limit": HOUSEKEEPING_BATCH_ROWS}
        )
        return [(row.value, row.value) for row in rows]

    async def _remove_orphans(
        self, connection: AsyncConnection, sweep: OrphanSweep, keys: list[UUID], *, dry_run: bool
    ) -> Counter[str]:
        """Delete (or count) the orphaned rows of one slice, found by their walk keys."""
        condition = (
            self._database.among(sweep.reference, keys)
            if sweep.walk == "by_reference"
            else self._database.among(sweep.table.c.id, keys)
        )
        if dry_run:
            count = await connection.execute(
                sa.select(sa.func.count()).select_from(sweep.table).where(condition)
            )
            return Counter({sweep.table.name: count.scalar_one()})
        if sweep.table is ARTIFACT_COLLECTION:
            stale_keys = await connection.execute(sa.select(ARTIFACT_COLLECTION.c.key).where(condition))
            repaired = await self._database.repair_collections(connection, stale_keys.scalars())
            return Counter(repaired.counts())
        if sweep.table is ARTIFACT:
            removed = await connection.execute(sa.delete(ARTIFACT).where(condition).returning(ARTIFACT.c.key))
            artifact_keys = list(removed.scalars())
            repaired = await self._database.repair_collections(
                connection, [key for key in artifact_keys if key]
            )
            return Counter(repaired.counts()) + Counter({"artifact": len(artifact_keys)})
        return Counter(
            {sweep.table.name: (await connection.execute(sa.delete(sweep.table).where(condition))).rowcount}
        )

    # VACUUM ----------------------------------------------------------------------------

    async def vacuum(self, touched_tables: Iterable[str]) -> list[str]:
        """`VACUUM (ANALYZE)` the tables rows were deleted from (SQLite: `ANALYZE`), outside a transaction."""
        tables = set()
        for counted in touched_tables:
            table = counted.partition(" ")[0]  # "artifact_collection re-pointed" touched the table too
            tables.add(table)
            tables.update(CASCADES_TO.get(table, ()))
        tables = sorted(table for table in tables if table in TABLES)
        if not tables:
            return []
        async with connect(
            self._database.url, statement_timeout_seconds=VACUUM_TIMEOUT_SECONDS
        ) as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            if self._database.dialect == "postgresql":
                await connection.exec_driver_sql(f"VACUUM (ANALYZE) {', '.join(tables)}")
            else:
                # SQLite's VACUUM rewrites the whole file under an exclusive lock: statistics only.
                for table in tables:
                    await connection.exec_driver_sql(f"ANALYZE {table}")
        return tables

    # The API engine's leftovers --------------------------------------------------------

    async def delete_left_by_the_api(
        self, flow_run_ids: list[UUID], task_run_state_ids: list[UUID], *, dry_run: bool
    ) -> dict[str, int]:
        """For the API engine, which has no route for them: the logs of `flow_run_ids` and the
        cache rows of `task_run_state_ids`, in one transaction. Only rows whose run (or state)
        is gone are deleted, so a run that is still there keeps its rows whatever ids come in;
        a dry run counts them before their runs go."""
        targets = (
            (LOG, LOG.c.flow_run_id, FLOW_RUN.c.id, flow_run_ids),
            (
                TASK_RUN_STATE_CACHE,
                TASK_RUN_STATE_CACHE.c.task_run_state_id,
                TASK_RUN_STATE.c.id,
                task_run_state_ids,
            ),
        )
        rows: dict[str, int] = {}
        if not (flow_run_ids or task_run_state_ids):
            return rows
        async with self._database.transaction(write=not dry_run) as connection:
            for table, reference, owner, ids in targets:
                if not ids:
                    continue
                if dry_run:
                    statement = (
                        sa.select(sa.func.count())
                        .select_from(table)
                        .where(self._database.among(reference, ids))
                    )
                    rows[table.name] = (await connection.execute(statement)).scalar_one()
                else:
                    owner_gone = ~sa.exists().where(owner == reference)
                    statement = sa.delete(table).where(self._database.among(reference, ids), owner_gone)
                    rows[table.name] = (await connection.execute(statement)).rowcount
        return rows
