"""What a batch's runs own in Prefect's database: counted and measured (a dry run), or
deleted and measured (a real run), in the batch's transaction.

Part of the SQL engine (`sql_engine` judges the batch and hands the accepted runs here):
the SQL engine's modules are the only ones in the project that write to Prefect's tables.
The runs' task run cache rows, logs, artifacts, task runs, states and inputs and the runs
themselves go on PostgreSQL in one statement (on SQLite a delete per table, states and
inputs by cascade); the artifact collections whose latest artifact went are re-pointed or
removed last. Every delete sums the space of its rows (`PrefectDatabase.row_bytes`,
PostgreSQL); a dry run counts and measures the very same rows and forecasts the
collections (`artifact_collections.CollectionForecast`).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.retention.artifact_collections import CollectionForecast
from tasks.retention.report import BatchOutcome
from tasks.retention.sql_database import (
    ARTIFACT,
    FLOW_RUN,
    FLOW_RUN_INPUT,
    FLOW_RUN_STATE,
    LOG,
    TASK_RUN,
    TASK_RUN_STATE,
    TASK_RUN_STATE_CACHE,
    PrefectDatabase,
)


class Measured:
    """Rows per table, and the space they take (None: not measured, on SQLite)."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.bytes: dict[str, int] | None = {}

    def add(self, table: sa.Table, counted: tuple[int, int | None]) -> None:
        rows, size = counted
        self.rows[table.name] = rows
        if size is None or self.bytes is None:
            self.bytes = None
        else:
            self.bytes[table.name] = int(size)


class OwnedRows:
    """The rows of a batch's accepted runs, on the SQL engine's database."""

    def __init__(self, database: PrefectDatabase) -> None:
        self._database = database
        # A dry run's memory of the artifact collections its batches would change.
        self._forecast = CollectionForecast(repairs_missing_latest=True)

    async def _rows_of(
        self, connection: AsyncConnection, flow_run_ids: list[UUID]
    ) -> list[tuple[sa.Table, sa.ColumnElement[bool]]]:
        """What the runs own, in deletion order; flow_run_state, task_run_state and flow_run_input cascade."""
        task_runs = sa.select(TASK_RUN.c.id).where(self._database.among(TASK_RUN.c.flow_run_id, flow_run_ids))
        owned = []
        # Prefect 3 clients no longer write cache rows: usually there are none, or a few,
        # and the planner starts from them; when there are none the statement is skipped.
        if (await connection.execute(sa.select(sa.exists().select_from(TASK_RUN_STATE_CACHE)))).scalar():
            states = sa.select(TASK_RUN_STATE.c.id).where(TASK_RUN_STATE.c.task_run_id.in_(task_runs))
            owned.append((TASK_RUN_STATE_CACHE, TASK_RUN_STATE_CACHE.c.task_run_state_id.in_(states)))
        return owned + [
            (LOG, self._database.among(LOG.c.flow_run_id, flow_run_ids)),
            (ARTIFACT, self._database.among(ARTIFACT.c.flow_run_id, flow_run_ids)),
            (TASK_RUN, self._database.among(TASK_RUN.c.flow_run_id, flow_run_ids)),
            (FLOW_RUN, self._database.among(FLOW_RUN.c.id, flow_run_ids)),
        ]

    def _cascades(self, flow_run_ids: list[UUID]) -> list[tuple[sa.Table, sa.ColumnElement[bool]]]:
        """The rows the foreign keys take with the runs and task runs (states, inputs): the
        report says everything that went. A dry run and SQLite count them before the
        deletes; on PostgreSQL the batch's one statement deletes them itself."""
        task_runs = sa.select(TASK_RUN.c.id).where(self._database.among(TASK_RUN.c.flow_run_id, flow_run_ids))
        return [
            (FLOW_RUN_STATE, self._database.among(FLOW_RUN_STATE.c.flow_run_id, flow_run_ids)),
            # As index probes: planned as `IN (subquery)`, a batch's few thousand states were
            # found by hashing the whole task_run_state table (measured 49 ms a batch at
            # 21,000 runs and growing with the table, against 11 ms).
            (TASK_RUN_STATE, self._database.among_subquery(TASK_RUN_STATE.c.task_run_id, task_runs)),
            (FLOW_RUN_INPUT, self._database.among(FLOW_RUN_INPUT.c.flow_run_id, flow_run_ids)),
        ]

    async def _cascaded(self, connection: AsyncConnection, flow_run_ids: list[UUID]) -> Measured:
        measured = Measured()
        for table, owned in self._cascades(flow_run_ids):
            measured.add(table, (await connection.execute(self._measure(table, owned))).one())
        return measured

    def _measure(self, table: sa.Table, condition: sa.ColumnElement[bool]) -> sa.Select:
        """How many rows of `table` match, and (PostgreSQL) the space they take.

        Each row is sized in a materialized CTE: summed straight in the aggregate, the
        whole-row value reaches `pg_column_size` rebuilt, and measured a few bytes short of
        the row as stored (and as a delete's RETURNING measures it)."""
        size = self._database.row_bytes(table)
        if size is None:
            return sa.select(sa.func.count(), sa.null()).select_from(table).where(condition)
        sized = (
            sa.select(size.label("bytes"))
            .where(condition)
            .cte(f"sized_{table.name}")
            .prefix_with("MATERIALIZED")
        )
        return sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(sized.c.bytes), 0)).select_from(sized)

    async def count(self, connection: AsyncConnection, flow_run_ids: list[UUID]) -> BatchOutcome:
        """The rows a real run would delete with the runs, their space, and the collections it would change."""
        if not flow_run_ids:
            return BatchOutcome()
        measured = await self._cascaded(connection, flow_run_ids)
        for table, owned in await self._rows_of(connection, flow_run_ids):
            measured.add(table, (await self._execute(connection, table, self._measure(table, owned))).one())
        keyed = await connection.execute(
            sa.select(ARTIFACT.c.id, ARTIFACT.c.key).where(
                self._database.among(ARTIFACT.c.flow_run_id, flow_run_ids), ARTIFACT.c.key.is_not(None)
            )
        )
        changes = await self._forecast.forecast(
            keyed.all(),
            lambda keys: self._database.collections_of(connection, keys),
            lambda keys: self._database.artifacts_per_key(connection, keys),
        )
        return BatchOutcome(rows=measured.rows, bytes=measured.bytes, collections=changes)

    async def delete(self, connection: AsyncConnection, flow_run_ids: list[UUID]) -> BatchOutcome:
        """Delete the runs with what they own; the rows deleted, their space, the collections changed."""
        if not flow_run_ids:
            return BatchOutcome()
        owned_rows = await self._rows_of(connection, flow_run_ids)
        if self._database.dialect == "postgresql":
            measured, artifact_keys = await self._delete_in_one_statement(
                connection, flow_run_ids, owned_rows
            )
        else:
            measured, artifact_keys = await self._delete_table_by_table(connection, flow_run_ids, owned_rows)
        changes = await self._database.repair_collections(connection, artifact_keys)
        return BatchOutcome(rows=measured.rows, bytes=measured.bytes, collections=changes)

    async def _delete_in_one_statement(
        self,
        connection: AsyncConnection,
        flow_run_ids: list[UUID],
        owned_rows: list[tuple[sa.Table, sa.ColumnElement[bool]]],
    ) -> tuple[Measured, set[str]]:
        """PostgreSQL: every owned table's rows deleted in one statement, one round trip
        instead of eight; one row back per table, with its rows and their space.

        The rows the foreign keys would cascade to (states, inputs) are deleted by the
        statement itself, so each row is measured as it goes, from the delete's RETURNING:
        measuring them first cost a second pass of index probes, 8% of the statement.
        Every part of the statement sees the rows as they were when it began, and the
        foreign keys' actions run after it, on rows it has deleted already: the runs'
        `state_id` and the subflows' `parent_task_run_id` are never set to NULL first, and
        the runs are measured as they were."""
        measured = Measured()
        parts: list[tuple[sa.Table, sa.CTE]] = []
        for table, owned in self._cascades(flow_run_ids) + owned_rows:
            size = self._database.row_bytes(table)
            assert size is not None, "rows are sized on PostgreSQL"
            if table is TASK_RUN_STATE_CACHE:
                # Planned for the batch's own ids, on its own (see `_execute`).
                gone = sa.delete(table).where(owned).returning(size.label("bytes")).cte("gone")
                summed = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(gone.c.bytes), 0))
                measured.add(table, (await self._execute(connection, table, summed)).one())
                continue
            returned = [size.label("bytes")] + ([ARTIFACT.c.key] if table is ARTIFACT else [])
            parts.append(
                (table, sa.delete(table).where(owned).returning(*returned).cte(f"gone_{table.name}"))
            )
        no_keys = sa.cast(sa.null(), postgresql.ARRAY(sa.String))
        per_table = sa.union_all(
            *(
                sa.select(
                    sa.literal(table.name).label("table_name"),
                    sa.func.count().label("rows"),
                    sa.func.coalesce(sa.func.sum(rows.c.bytes), 0).label("bytes"),
                    (
                        sa.func.array_agg(sa.distinct(rows.c.key)).filter(rows.c.key.is_not(None))
                        if table is ARTIFACT
                        else no_keys
                    ).label("keys"),
                ).select_from(rows)
                for table, rows in parts
            )
        )
        artifact_keys: set[str] = set()
        tables = {table.name: table for table, _ in parts}
        for row in await connection.execute(per_table):
            measured.add(tables[row.table_name], (row.rows, row.bytes))
            artifact_keys.update(row.keys or ())
        return measured, artifact_keys

    async def _delete_table_by_table(
        self,
        connection: AsyncConnection,
        flow_run_ids: list[UUID],
        owned_rows: list[tuple[sa.Table, sa.ColumnElement[bool]]],
    ) -> tuple[Measured, set[str]]:
        """SQLite (no data-modifying CTEs, no sizes): count the cascades, then one delete per table."""
        measured = await self._cascaded(connection, flow_run_ids)
        artifact_keys: set[str] = set()
        for table, owned in owned_rows:
            if table is ARTIFACT:
                keys = (
                    await connection.execute(sa.delete(ARTIFACT).where(owned).returning(ARTIFACT.c.key))
                ).all()
                artifact_keys.update(row.key for row in keys if row.key is not None)
                measured.add(table, (len(keys), None))
            else:
                measured.add(
                    table, ((await connection.execute(sa.delete(table).where(owned))).rowcount, None)
                )
        return measured, artifact_keys

    async def _execute(self, connection: AsyncConnection, table: sa.Table, statement: sa.Executable) -> Any:
        """Execute one statement over the batch's rows of `table`.

        The cache rows' statement is planned for the batch's own ids: after five runs of a
        prepared statement PostgreSQL would reuse a generic plan that cannot see them
        (measured: 15-45 ms a batch instead of under 1 ms). Not the other statements: the
        foreign-key cascades of the deletes would then be re-planned for every row.
        """
        if table is not TASK_RUN_STATE_CACHE or self._database.dialect != "postgresql":
            return await connection.execute(statement)
        await connection.exec_driver_sql("SET LOCAL plan_cache_mode = force_custom_plan")
        result = await connection.execute(statement)
        await connection.exec_driver_sql("SET LOCAL plan_cache_mode = DEFAULT")
        return result
