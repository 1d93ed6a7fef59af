"""The SQL engine: retention straight in Prefect's database (PostgreSQL or SQLite).

This is the only module of the project that writes SQL to Prefect's tables. It uses
Prefect's own table definitions (so types such as SQLite timestamps bind exactly as the
server writes them) and `tasks.database` connections (`statement_timeout`, `lock_timeout`,
`application_name`).

Per batch of top-level runs, one short transaction:
1. find every subflow of the batch (`parent_task_run_id -> task_run -> flow_run`, any depth,
   a level at a time);
2. read the batch's runs again, locking them (`FOR UPDATE SKIP LOCKED`; on SQLite the
   transaction starts with `BEGIN IMMEDIATE` instead) and let the policy judge each tree;
3. delete what the accepted runs own and no foreign key cascades to (task run cache rows,
   logs, artifacts), then the task runs and flow runs (their states and inputs cascade), and
   re-point or delete the artifact collections whose latest artifact went.
A run that changed or is locked is left for the next run; a batch that cannot get its
locks within `lock_timeout` is left whole. A purge holds a PostgreSQL advisory lock, so two
purges never overlap. Orphans and old events are swept in bounded batches driven by indexes
every Prefect 3 schema has (a 3.4 schema lacks the 3.7 and 3.8 indexes on event_resources).
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from time import perf_counter
from typing import Any, Literal
from uuid import UUID

import sqlalchemy as sa
from prefect.server.database import orm_models
from prefect.server.schemas.states import StateType
from prefect.server.utilities.database import UUID as PrefectUuid
from pydantic import SecretStr
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.database import connect, create_engine, dialect_of
from tasks.retention.parameters import TERMINAL_STATES
from tasks.retention.policy import RetentionPolicy, RunRecord, judge_trees
from tasks.retention.rate_limit import Deadline
from tasks.retention.report import BatchOutcome

# SQLAlchemy 2.1 asks every custom column type for operator classes; Prefect's UUID type
# has none yet. Its columns compare correctly; the warning would fill the worker's log.
warnings.filterwarnings(
    "ignore", message=r".*does not refer to an OperatorClass.*", category=DeprecationWarning
)

TABLES = orm_models.Base.metadata.tables
FLOW = TABLES["flow"]
DEPLOYMENT = TABLES["deployment"]
FLOW_RUN = TABLES["flow_run"]
TASK_RUN = TABLES["task_run"]
TASK_RUN_STATE = TABLES["task_run_state"]
TASK_RUN_STATE_CACHE = TABLES["task_run_state_cache"]
LOG = TABLES["log"]
ARTIFACT = TABLES["artifact"]
ARTIFACT_COLLECTION = TABLES["artifact_collection"]
EVENTS = TABLES["events"]
EVENT_RESOURCES = TABLES["event_resources"]


def _age_reference() -> sa.ColumnElement[datetime]:
    """The SQL twin of `policy.age_reference`."""
    return sa.func.coalesce(
        FLOW_RUN.c.end_time, FLOW_RUN.c.state_timestamp, FLOW_RUN.c.expected_start_time, FLOW_RUN.c.created
    )


# What a `RunRecord` holds, worked out by the database: decoding four timestamps and an
# enum per row in Python would cost more than deleting the row.
RUN_COLUMNS = (
    FLOW_RUN.c.id,
    FLOW_RUN.c.name,
    FLOW_RUN.c.flow_id,
    FLOW_RUN.c.deployment_id,
    sa.case(
        (FLOW_RUN.c.state_id.is_(None), sa.null()), else_=sa.cast(FLOW_RUN.c.state_type, sa.String)
    ).label("state_type"),
    _age_reference().label("finished"),
    FLOW_RUN.c.tags,
    FLOW_RUN.c.parent_task_run_id,
)


# Deleting these rows deletes their children through ON DELETE CASCADE; VACUUM needs both.
CASCADES_TO = {"flow_run": ("flow_run_state", "flow_run_input"), "task_run": ("task_run_state",)}
# Events and orphans: rows per housekeeping transaction.
HOUSEKEEPING_BATCH_ROWS = 5_000
# VACUUM of a big table can take minutes; it blocks no reader or writer.
VACUUM_TIMEOUT_SECONDS = 3_600.0
# Lock timeout (PostgreSQL) and a busy database (SQLite): leave the batch for later.
BUSY_SQLSTATES = {"55P03"}
ADVISORY_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"prefect-maintenance retention").digest()[:8], "big", signed=True
)
NIL_UUID = UUID(int=0)
EVENT_ID_INDEX_SQL = """
SELECT EXISTS (
    SELECT FROM pg_index AS i
    JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    WHERE i.indrelid = to_regclass('event_resources') AND a.attname = 'event_id' AND i.indisvalid
)
"""


class RetentionAlreadyRunning(RuntimeError):
    """Another purge holds the retention advisory lock on this database."""


class SqlBatchFailed(RuntimeError):
    """A batch's transaction failed and was rolled back; nothing of it was deleted."""


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


def run_record(row: Any) -> RunRecord:
    return RunRecord(
        id=row.id,
        name=row.name,
        flow_id=row.flow_id,
        deployment_id=row.deployment_id,
        state_type=row.state_type,
        finished=row.finished,
        tags=tuple(row.tags or ()),
        parent_task_run_id=row.parent_task_run_id,
    )


def _state_types(states: Iterable[str]) -> list[StateType]:
    return [StateType(state) for state in states]


class SqlEngine:
    """Retention through direct database access; one instance per flow run."""

    name = "sql"

    def __init__(self, url: str | SecretStr) -> None:
        self.url = url
        self.dialect = dialect_of(url)
        self._engine = create_engine(url)
        # Whether event_resources has an index on event_id (Prefect 3.8's migration adds it).
        self._resources_indexed_by_event: bool | None = None

    async def close(self) -> None:
        await self._engine.dispose()

    def _among(self, column: sa.ColumnElement[Any], values: Iterable[Any]) -> sa.ColumnElement[bool]:
        """`column = ANY(:array)` on PostgreSQL (one parameter, any length); `IN (...)` on SQLite."""
        values = list(values)
        if self.dialect != "postgresql":
            return column.in_(values)
        return column == sa.any_(_array_of(column, values))

    def _among_unestimated(
        self, column: sa.ColumnElement[Any], values: Iterable[Any]
    ) -> sa.ColumnElement[bool]:
        """`_among`, but PostgreSQL plans it without seeing how many values there are
        (`= ANY(ARRAY(SELECT unnest(:array)))`): thousands of index probes are then planned as
        probes, where their summed estimate would tip a mid-sized table into a sequential scan."""
        values = list(values)
        if self.dialect != "postgresql":
            return column.in_(values)
        return self._among_subquery(column, sa.select(sa.func.unnest(_array_of(column, values))))

    @asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        """One transaction: committed at the end, rolled back (by closing) on any error."""
        async with self._engine.connect() as connection:
            if write and self.dialect == "sqlite":
                # SQLite has no row locks: take the write lock before reading, so the
                # runs judged are exactly the runs deleted.
                await connection.exec_driver_sql("BEGIN IMMEDIATE")
            yield connection
            await connection.commit()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the retention advisory lock (PostgreSQL) for the whole purge."""
        if self.dialect != "postgresql":
            # Every SQLite write transaction is exclusive already.
            yield
            return
        async with self._engine.connect() as connection:
            # Autocommit: the session holds the lock without sitting idle in a transaction.
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            locked = (
                await connection.execute(sa.select(sa.func.pg_try_advisory_lock(ADVISORY_LOCK_KEY)))
            ).scalar()
            if not locked:
                raise RetentionAlreadyRunning(
                    "another retention run is deleting in this database (it holds the retention "
                    "advisory lock); nothing was deleted, try again when it has finished"
                )
            try:
                yield
            finally:
                # A lost session has released the lock already.
                with contextlib.suppress(sa.exc.DBAPIError):
                    await connection.execute(sa.select(sa.func.pg_advisory_unlock(ADVISORY_LOCK_KEY)))

    # Reads -----------------------------------------------------------------------------

    async def _read(self, statement: sa.Executable) -> Sequence[Any]:
        async with self._engine.connect() as connection:
            return (await connection.execute(statement)).all()

    async def deployments_named(self, names: Iterable[str]) -> dict[str, UUID]:
        names = set(names)
        rows = await self._read(
            sa.select(DEPLOYMENT.c.id, FLOW.c.name.label("flow_name"), DEPLOYMENT.c.name)
            .select_from(DEPLOYMENT.join(FLOW, FLOW.c.id == DEPLOYMENT.c.flow_id))
            .where(DEPLOYMENT.c.name.in_({name.partition("/")[2] for name in names}))
        )
        found = {f"{row.flow_name}/{row.name}": row.id for row in rows}
        return {name: deployment_id for name, deployment_id in found.items() if name in names}

    async def flows_named(self, names: Iterable[str]) -> dict[str, UUID]:
        rows = await self._read(sa.select(FLOW.c.name, FLOW.c.id).where(FLOW.c.name.in_(set(names))))
        return {row.name: row.id for row in rows}

    async def newest_per_deployment(self, keep: int) -> set[UUID]:
        """The `keep` newest finished runs of every deployment (by the age reference, then id)."""
        ranked = (
            sa.select(
                FLOW_RUN.c.id,
                sa.func.row_number()
                .over(
                    partition_by=FLOW_RUN.c.deployment_id,
                    order_by=(_age_reference().desc(), FLOW_RUN.c.id.desc()),
                )
                .label("position"),
            )
            .where(
                FLOW_RUN.c.deployment_id.is_not(None),
                FLOW_RUN.c.state_id.is_not(None),
                FLOW_RUN.c.state_type.in_(_state_types(TERMINAL_STATES)),
            )
            .subquery()
        )
        return {row.id for row in await self._read(sa.select(ranked.c.id).where(ranked.c.position <= keep))}

    def _candidate_filter(self, policy: RetentionPolicy) -> list[sa.ColumnElement[bool]]:
        """Never narrower than the policy (the policy decides on each row), and index-friendly."""
        conditions = [
            FLOW_RUN.c.parent_task_run_id.is_(None),
            FLOW_RUN.c.state_id.is_not(None),
            FLOW_RUN.c.state_type.in_(_state_types(policy.states)),
        ]
        if policy.deployment_ids is not None:
            conditions.append(self._among(FLOW_RUN.c.deployment_id, policy.deployment_ids))
        if policy.flow_ids is not None:
            conditions.append(self._among(FLOW_RUN.c.flow_id, policy.flow_ids))
        return conditions

    def _ended_before(self, policy: RetentionPolicy) -> sa.ColumnElement[bool]:
        return FLOW_RUN.c.end_time < policy.latest_cutoff

    def _never_ended_before(self, policy: RetentionPolicy) -> sa.ColumnElement[bool]:
        return sa.and_(FLOW_RUN.c.end_time.is_(None), _age_reference() < policy.latest_cutoff)

    async def count_candidates(self, policy: RetentionPolicy) -> int:
        old = sa.or_(self._ended_before(policy), self._never_ended_before(policy))
        rows = await self._read(
            sa.select(sa.func.count()).select_from(FLOW_RUN).where(*self._candidate_filter(policy), old)
        )
        return rows[0][0]

    async def candidates(self, policy: RetentionPolicy, page_size: int) -> AsyncIterator[list[RunRecord]]:
        """Candidate top-level runs a page at a time, oldest first.

        Keyset pages (deletions in between do not shift them): runs that ended, along the
        `end_time` index in (end_time, id) order; then the few that never got an end time.
        """
        conditions = self._candidate_filter(policy)
        last: tuple[datetime, UUID] | None = None
        while True:
            ended = [self._ended_before(policy)]
            if last is not None:
                ended += [
                    FLOW_RUN.c.end_time >= last[0],
                    sa.or_(FLOW_RUN.c.end_time > last[0], FLOW_RUN.c.id > last[1]),
                ]
            rows = await self._read(
                sa.select(*RUN_COLUMNS)
                .where(*conditions, *ended)
                .order_by(FLOW_RUN.c.end_time, FLOW_RUN.c.id)
                .limit(page_size)
            )
            if rows:
                yield [run_record(row) for row in rows]
                last = (rows[-1].finished, rows[-1].id)  # `finished` is the end time here
            if len(rows) < page_size:
                break
        after = NIL_UUID
        while True:
            rows = await self._read(
                sa.select(*RUN_COLUMNS)
                .where(*conditions, self._never_ended_before(policy), FLOW_RUN.c.id > after)
                .order_by(FLOW_RUN.c.id)
                .limit(page_size)
            )
            if rows:
                yield [run_record(row) for row in rows]
                after = rows[-1].id
            if len(rows) < page_size:
                return

    async def names_of(
        self, flow_ids: Iterable[UUID], deployment_ids: Iterable[UUID]
    ) -> tuple[dict[UUID, str], dict[UUID, str]]:
        flows = await self._read(sa.select(FLOW.c.id, FLOW.c.name).where(self._among(FLOW.c.id, flow_ids)))
        deployments = await self._read(
            sa.select(DEPLOYMENT.c.id, FLOW.c.name.label("flow_name"), DEPLOYMENT.c.name)
            .select_from(DEPLOYMENT.join(FLOW, FLOW.c.id == DEPLOYMENT.c.flow_id))
            .where(self._among(DEPLOYMENT.c.id, deployment_ids))
        )
        return (
            {row.id: row.name for row in flows},
            {row.id: f"{row.flow_name}/{row.name}" for row in deployments},
        )

    # One batch -------------------------------------------------------------------------

    async def process_batch(
        self, roots: list[RunRecord], policy: RetentionPolicy, dry_run: bool
    ) -> BatchOutcome:
        """Judge the batch's trees on fresh, locked rows and delete (or count) what may go."""
        started = perf_counter()
        root_ids = [run.id for run in roots]
        try:
            async with self._transaction(write=not dry_run) as connection:
                members_of = await self._subflows(connection, root_ids)
                every_id = root_ids + [member for members in members_of.values() for member in members]
                current = await self._read_runs(connection, every_id, lock=not dry_run)
                verdict = judge_trees(root_ids, members_of, current, policy)
                accepted = [run.id for run in verdict.accepted]
                rows = (
                    await self._count_owned(connection, accepted)
                    if dry_run
                    else await self._delete_owned(connection, accepted)
                )
        except sa.exc.DBAPIError as error:
            if not _is_busy(error):
                raise SqlBatchFailed(f"the batch was rolled back: {_first_line(error)}") from None
            return BatchOutcome(
                left=Counter({"locked: lock_timeout reached": len(roots)}), seconds=perf_counter() - started
            )
        return BatchOutcome(
            runs=verdict.accepted, rows=rows, left=verdict.left, seconds=perf_counter() - started
        )

    async def _subflows(self, connection: AsyncConnection, root_ids: list[UUID]) -> dict[UUID, list[UUID]]:
        """Every subflow, at any depth, of each root: one statement per level of the trees.

        Each statement probes the `parent_task_run_id` index once per task run of the level
        (`= ANY(ARRAY(...))`). A recursive CTE would be one statement, but PostgreSQL plans
        its recursive step blind (it guesses ten times the rows of the first) and hashes the
        whole task_run table for every batch: measured 25 ms a batch at 30,000 runs and
        growing with the table, against 2 ms here whatever its size.
        """
        members_of: dict[UUID, list[UUID]] = {}
        root_of = {root: root for root in root_ids}
        level = root_ids
        while level:
            level_task_runs = sa.select(TASK_RUN.c.id).where(self._among(TASK_RUN.c.flow_run_id, level))
            children = await connection.execute(
                sa.select(FLOW_RUN.c.id, TASK_RUN.c.flow_run_id.label("parent_id"))
                .select_from(FLOW_RUN.join(TASK_RUN, TASK_RUN.c.id == FLOW_RUN.c.parent_task_run_id))
                .where(self._among_subquery(FLOW_RUN.c.parent_task_run_id, level_task_runs))
            )
            level = []
            for child in children:
                if child.id in root_of:  # a cycle in corrupt data: walk each run once
                    continue
                root_of[child.id] = root_of[child.parent_id]
                members_of.setdefault(root_of[child.id], []).append(child.id)
                level.append(child.id)
        return members_of

    def _among_subquery(self, column: sa.ColumnElement[Any], subquery: sa.Select) -> sa.ColumnElement[bool]:
        """`column = ANY(ARRAY(subquery))` on PostgreSQL: planned as index probes, whatever the estimates."""
        if self.dialect != "postgresql":
            return column.in_(subquery)
        return column == sa.any_(sa.func.array(subquery.scalar_subquery()))

    async def _read_runs(
        self, connection: AsyncConnection, ids: list[UUID], *, lock: bool
    ) -> dict[UUID, RunRecord]:
        statement = sa.select(*RUN_COLUMNS).where(self._among(FLOW_RUN.c.id, ids))
        if lock:
            # Rows another transaction is changing right now are skipped, never waited for.
            statement = statement.with_for_update(skip_locked=True)
        return {row.id: run_record(row) for row in await connection.execute(statement)}

    async def _owned_rows(
        self, connection: AsyncConnection, flow_run_ids: list[UUID]
    ) -> list[tuple[sa.Table, sa.ColumnElement[bool]]]:
        """What the runs own, in deletion order; flow_run_state, task_run_state and flow_run_input cascade."""
        task_runs = sa.select(TASK_RUN.c.id).where(self._among(TASK_RUN.c.flow_run_id, flow_run_ids))
        owned = []
        # Prefect 3 clients no longer write cache rows: usually there are none, or a few,
        # and the planner starts from them; when there are none the statement is skipped.
        if (await connection.execute(sa.select(sa.exists().select_from(TASK_RUN_STATE_CACHE)))).scalar():
            states = sa.select(TASK_RUN_STATE.c.id).where(TASK_RUN_STATE.c.task_run_id.in_(task_runs))
            owned.append((TASK_RUN_STATE_CACHE, TASK_RUN_STATE_CACHE.c.task_run_state_id.in_(states)))
        return owned + [
            (LOG, self._among(LOG.c.flow_run_id, flow_run_ids)),
            (ARTIFACT, self._among(ARTIFACT.c.flow_run_id, flow_run_ids)),
            (TASK_RUN, self._among(TASK_RUN.c.flow_run_id, flow_run_ids)),
            (FLOW_RUN, self._among(FLOW_RUN.c.id, flow_run_ids)),
        ]

    async def _count_owned(self, connection: AsyncConnection, flow_run_ids: list[UUID]) -> dict[str, int]:
        if not flow_run_ids:
            return {}
        counts = {}
        for table, owned in await self._owned_rows(connection, flow_run_ids):
            statement = sa.select(sa.func.count()).select_from(table).where(owned)
            counts[table.name] = (await self._execute(connection, table, statement)).scalar_one()
        return counts

    async def _delete_owned(self, connection: AsyncConnection, flow_run_ids: list[UUID]) -> dict[str, int]:
        if not flow_run_ids:
            return {}
        deleted: Counter[str] = Counter()
        artifact_keys: set[str] = set()
        for table, owned in await self._owned_rows(connection, flow_run_ids):
            if table is ARTIFACT:
                keys = await connection.execute(sa.delete(ARTIFACT).where(owned).returning(ARTIFACT.c.key))
                all_keys = list(keys.scalars())
                deleted["artifact"] += len(all_keys)
                artifact_keys.update(key for key in all_keys if key is not None)
            else:
                deleted[table.name] += (
                    await self._execute(connection, table, sa.delete(table).where(owned))
                ).rowcount
        deleted.update(await self._repair_collections(connection, artifact_keys))
        return dict(deleted)

    async def _execute(self, connection: AsyncConnection, table: sa.Table, statement: sa.Executable) -> Any:
        """Execute one statement over the batch's rows of `table`.

        The cache rows' statement is planned for the batch's own ids: after five runs of a
        prepared statement PostgreSQL would reuse a generic plan that cannot see them
        (measured: 15-45 ms a batch instead of under 1 ms). Not the other statements: the
        foreign-key cascades of the deletes would then be re-planned for every row.
        """
        if table is not TASK_RUN_STATE_CACHE or self.dialect != "postgresql":
            return await connection.execute(statement)
        await connection.exec_driver_sql("SET LOCAL plan_cache_mode = force_custom_plan")
        result = await connection.execute(statement)
        await connection.exec_driver_sql("SET LOCAL plan_cache_mode = DEFAULT")
        return result

    async def _repair_collections(self, connection: AsyncConnection, keys: Iterable[str]) -> Counter[str]:
        """Point each collection whose latest artifact is gone at the key's newest artifact left, or delete it."""
        keys = sorted(set(keys))
        if not keys:
            return Counter()
        latest_is_gone = ~sa.exists().where(ARTIFACT.c.id == ARTIFACT_COLLECTION.c.latest_id)
        stale = list(
            (
                await connection.execute(
                    sa.select(ARTIFACT_COLLECTION.c.key).where(
                        self._among(ARTIFACT_COLLECTION.c.key, keys), latest_is_gone
                    )
                )
            ).scalars()
        )
        if not stale:
            return Counter()
        newest = (
            sa.select(
                ARTIFACT,
                sa.func.row_number()
                .over(partition_by=ARTIFACT.c.key, order_by=(ARTIFACT.c.created.desc(), ARTIFACT.c.id.desc()))
                .label("position"),
            )
            .where(self._among(ARTIFACT.c.key, stale))
            .subquery()
        )
        copied = (
            "data",
            "description",
            "type",
            "created",
            "updated",
            "flow_run_id",
            "task_run_id",
            "metadata_",
        )
        repointed = await connection.execute(
            sa.update(ARTIFACT_COLLECTION)
            .where(ARTIFACT_COLLECTION.c.key == newest.c.key, newest.c.position == 1)
            .values(latest_id=newest.c.id, **{column: newest.c[column] for column in copied})
        )
        removed = await connection.execute(
            sa.delete(ARTIFACT_COLLECTION).where(
                self._among(ARTIFACT_COLLECTION.c.key, stale), latest_is_gone
            )
        )
        return Counter(
            {"artifact_collection": removed.rowcount, "artifact_collection re-pointed": repointed.rowcount}
        )

    # Housekeeping ----------------------------------------------------------------------

    async def delete_old_events(
        self, rules: Iterable[EventRetention], deadline: Deadline, *, dry_run: bool
    ) -> dict[str, int]:
        """Each rule in turn, a batch of events at a time, oldest first: their resources, then the events.

        Batches walk `(occurred, id)` (an index every Prefect 3 schema has, alone or after
        `event`), a keyset page at a time, so a dry run counts the very batches a real run
        deletes and no batch re-reads what the previous one left.
        """
        found: Counter[str] = Counter()
        for rule in rules:
            after: tuple[datetime, UUID] | None = None
            while not deadline.passed:
                async with self._transaction(write=not dry_run) as connection:
                    batch = (await connection.execute(self._next_events(rule, after))).all()
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

    def _next_events(self, rule: EventRetention, after: tuple[datetime, UUID] | None) -> sa.Select:
        conditions = [rule.condition()]
        if after is not None:
            conditions += [
                EVENTS.c.occurred >= after[0],
                sa.or_(EVENTS.c.occurred > after[0], EVENTS.c.id > after[1]),
            ]
        return (
            sa.select(EVENTS.c.id, EVENTS.c.occurred, EVENTS.c.resource_id, EVENTS.c.related_resource_ids)
            .where(*conditions)
            .order_by(EVENTS.c.occurred, EVENTS.c.id)
            .limit(HOUSEKEEPING_BATCH_ROWS)
        )

    async def _remove_events(
        self, connection: AsyncConnection, batch: Sequence[Any], *, dry_run: bool
    ) -> Counter[str]:
        """Delete (or count) a batch of events (oldest first) and their resources."""
        event_ids = [event.id for event in batch]
        resources = self._among(EVENT_RESOURCES.c.event_id, event_ids)
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
                self._among_unestimated(EVENT_RESOURCES.c.resource_id, resource_ids),
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
            await connection.execute(sa.delete(EVENTS).where(self._among(EVENTS.c.id, event_ids)))
        ).rowcount
        return Counter({"event_resources": resources_deleted, "events": events_deleted})

    async def _resources_have_event_index(self, connection: AsyncConnection) -> bool:
        """A valid PostgreSQL index led by event_resources.event_id; SQLite always goes by resource."""
        if self._resources_indexed_by_event is None:
            self._resources_indexed_by_event = self.dialect == "postgresql" and bool(
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
            async with self._transaction(write=True) as connection:
                batch = sa.select(table.c.id).where(condition).order_by(walk).limit(HOUSEKEEPING_BATCH_ROWS)
                # `IN (subquery)` was planned as a hash join over a sequential scan of the table.
                deleted = sa.delete(table).where(self._among_subquery(table.c.id, batch))
                count = (await connection.execute(deleted)).rowcount
            total += count
            if count < HOUSEKEEPING_BATCH_ROWS:
                break
        return total

    async def sweep_orphans(self, deadline: Deadline, *, dry_run: bool) -> dict[str, int]:
        """Rows left behind by runs deleted elsewhere (the API, `db_vacuum`, an interrupted job)."""
        found: Counter[str] = Counter()
        for sweep in ORPHAN_SWEEPS:
            after = NIL_UUID
            while not deadline.passed:
                async with self._transaction(write=not dry_run) as connection:
                    pairs = await self._next_slice(connection, sweep, after)
                    if not pairs:
                        break
                    after = pairs[-1][0]
                    references = {reference for _, reference in pairs if reference is not None}
                    existing = set(
                        (
                            await connection.execute(
                                sa.select(sweep.target).where(self._among(sweep.target, references))
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
            self._among(sweep.reference, keys)
            if sweep.walk == "by_reference"
            else self._among(sweep.table.c.id, keys)
        )
        if dry_run:
            count = await connection.execute(
                sa.select(sa.func.count()).select_from(sweep.table).where(condition)
            )
            return Counter({sweep.table.name: count.scalar_one()})
        if sweep.table is ARTIFACT_COLLECTION:
            stale_keys = await connection.execute(sa.select(ARTIFACT_COLLECTION.c.key).where(condition))
            return await self._repair_collections(connection, stale_keys.scalars())
        if sweep.table is ARTIFACT:
            removed = await connection.execute(sa.delete(ARTIFACT).where(condition).returning(ARTIFACT.c.key))
            artifact_keys = list(removed.scalars())
            repaired = await self._repair_collections(connection, [key for key in artifact_keys if key])
            return repaired + Counter({"artifact": len(artifact_keys)})
        return Counter(
            {sweep.table.name: (await connection.execute(sa.delete(sweep.table).where(condition))).rowcount}
        )

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
        async with connect(self.url, statement_timeout_seconds=VACUUM_TIMEOUT_SECONDS) as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            if self.dialect == "postgresql":
                await connection.exec_driver_sql(f"VACUUM (ANALYZE) {', '.join(tables)}")
            else:
                # SQLite's VACUUM rewrites the whole file under an exclusive lock: statistics only.
                for table in tables:
                    await connection.exec_driver_sql(f"ANALYZE {table}")
        return tables

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
        async with self._transaction(write=not dry_run) as connection:
            for table, reference, owner, ids in targets:
                if not ids:
                    continue
                if dry_run:
                    statement = (
                        sa.select(sa.func.count()).select_from(table).where(self._among(reference, ids))
                    )
                    rows[table.name] = (await connection.execute(statement)).scalar_one()
                else:
                    owner_gone = ~sa.exists().where(owner == reference)
                    statement = sa.delete(table).where(self._among(reference, ids), owner_gone)
                    rows[table.name] = (await connection.execute(statement)).rowcount
        return rows


def _array_of(column: sa.ColumnElement[Any], values: list[Any]) -> sa.BindParameter:
    """`values` as one PostgreSQL array parameter of `column`'s type."""
    item_type = postgresql.UUID(as_uuid=True) if isinstance(column.type, PrefectUuid) else column.type
    return sa.bindparam(None, values, type_=postgresql.ARRAY(item_type))


def _is_busy(error: sa.exc.DBAPIError) -> bool:
    if getattr(error.orig, "sqlstate", None) in BUSY_SQLSTATES:
        return True
    return "database is locked" in str(error.orig)


def _first_line(error: sa.exc.DBAPIError) -> str:
    original = error.orig if error.orig is not None else error
    message = str(original).strip().splitlines()
    return f"{type(original).__name__}: {message[0] if message else 'no message'}"[:300]
