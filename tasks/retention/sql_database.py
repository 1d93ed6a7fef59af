"""Prefect's database as the SQL engine's modules use it: its tables, one transaction at a
time, and the conditions over many ids that every statement of theirs is built from.

Part of the SQL engine (`sql_engine` deletes the runs, `sql_housekeeping` sweeps what is
left): the SQL engine's modules are the only ones in the project that write to Prefect's
tables. Prefect's own table definitions are used, so types such as SQLite timestamps bind
exactly as the server writes them; connections come from `tasks.database`
(`statement_timeout`, `lock_timeout`, `application_name`).
"""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from prefect.server.database import orm_models
from prefect.server.utilities.database import UUID as PrefectUuid
from pydantic import SecretStr
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.database import create_engine, dialect_of
from tasks.retention.artifact_collections import CollectionChanges

# SQLAlchemy 2.1 asks every custom column type for operator classes; Prefect's UUID type
# has none yet. Its columns compare correctly; the warning would fill the worker's log.
warnings.filterwarnings(
    "ignore", message=r".*does not refer to an OperatorClass.*", category=DeprecationWarning
)

TABLES = orm_models.Base.metadata.tables
FLOW = TABLES["flow"]
DEPLOYMENT = TABLES["deployment"]
FLOW_RUN = TABLES["flow_run"]
FLOW_RUN_STATE = TABLES["flow_run_state"]
FLOW_RUN_INPUT = TABLES["flow_run_input"]
TASK_RUN = TABLES["task_run"]
TASK_RUN_STATE = TABLES["task_run_state"]
TASK_RUN_STATE_CACHE = TABLES["task_run_state_cache"]
LOG = TABLES["log"]
ARTIFACT = TABLES["artifact"]
ARTIFACT_COLLECTION = TABLES["artifact_collection"]
EVENTS = TABLES["events"]
EVENT_RESOURCES = TABLES["event_resources"]
# Where keyset walks over UUID keys start.
NIL_UUID = UUID(int=0)
# Every row's item identifier in its page's header.
LINE_POINTER_BYTES = 4


class PrefectDatabase:
    """One engine (connection pool) on Prefect's database, PostgreSQL or SQLite."""

    def __init__(self, url: str | SecretStr) -> None:
        self.url = url
        self.dialect = dialect_of(url)
        self._engine = create_engine(url)

    async def dispose(self) -> None:
        await self._engine.dispose()

    def connect(self) -> AsyncConnection:
        """A connection of the pool for a session that manages its own transactions."""
        return self._engine.connect()

    @asynccontextmanager
    async def transaction(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        """One transaction: committed at the end, rolled back (by closing) on any error."""
        async with self._engine.connect() as connection:
            if write and self.dialect == "sqlite":
                # SQLite has no row locks: take the write lock before reading, so the
                # rows judged are exactly the rows deleted.
                await connection.exec_driver_sql("BEGIN IMMEDIATE")
            yield connection
            await connection.commit()

    async def read(self, statement: sa.Executable) -> Sequence[Any]:
        async with self._engine.connect() as connection:
            return (await connection.execute(statement)).all()

    def among(self, column: sa.ColumnElement[Any], values: Iterable[Any]) -> sa.ColumnElement[bool]:
        """`column = ANY(:array)` on PostgreSQL (one parameter, any length); `IN (...)` on SQLite."""
        values = list(values)
        if self.dialect != "postgresql":
            return column.in_(values)
        return column == sa.any_(_array_of(column, values))

    def among_unestimated(
        self, column: sa.ColumnElement[Any], values: Iterable[Any]
    ) -> sa.ColumnElement[bool]:
        """`among`, but PostgreSQL plans it without seeing how many values there are
        (`= ANY(ARRAY(SELECT unnest(:array)))`): thousands of index probes are then planned as
        probes, where their summed estimate would tip a mid-sized table into a sequential scan."""
        values = list(values)
        if self.dialect != "postgresql":
            return column.in_(values)
        return self.among_subquery(column, sa.select(sa.func.unnest(_array_of(column, values))))

    def among_subquery(self, column: sa.ColumnElement[Any], subquery: sa.Select) -> sa.ColumnElement[bool]:
        """`column = ANY(ARRAY(subquery))` on PostgreSQL: planned as index probes, whatever the estimates."""
        if self.dialect != "postgresql":
            return column.in_(subquery)
        return column == sa.any_(sa.func.array(subquery.scalar_subquery()))

    def ids_of(self, subquery: sa.Select) -> sa.ColumnElement[Any]:
        """The ids a correlated one-column `subquery` selects, as one column of the outer
        row: a uuid array on PostgreSQL, comma-separated text on SQLite (`ids_from` reads both)."""
        if self.dialect != "postgresql":
            return subquery.with_only_columns(
                sa.func.group_concat(subquery.selected_columns[0])
            ).scalar_subquery()
        return sa.func.array(
            subquery.scalar_subquery(), type_=postgresql.ARRAY(postgresql.UUID(as_uuid=True))
        )

    def ids_from(self, value: Any) -> list[UUID]:
        """The ids of an `ids_of` column."""
        if not value:
            return []
        if isinstance(value, str):
            return [UUID(part) for part in value.split(",")]
        return list(value)

    def row_bytes(self, table: sa.Table) -> sa.ColumnElement[int] | None:
        """The space one row of `table` takes in its pages, for summing over the rows a batch
        deletes (PostgreSQL; None on SQLite, which has no such measure).

        Every row is measured, neither a sample nor the table's average row size: the
        average (`pg_relation_size / reltuples`) counts the table's free space and bloat,
        and old runs' rows are not average ones; a sample would give a dry run and a real
        run different figures. Exact is cheap: a real run's delete has each row in hand
        (its RETURNING sizes it), and a dry run reads the heap rows its counts would
        otherwise read from the index alone. Measured at 100,000 bulk-seeded runs on a busy
        2-core machine: a dry run of 92,732 expired runs took 13-16 s with the sizes and
        10-15 s without, a real run deleted 3,400 runs/s with them and 2,800 without (noise).
        The row as stored: header, values and padding, values kept out of line in TOAST at
        their stored (compressed) size; aligned as the page aligns it, with its 4-byte line
        pointer. The rows' index entries come on top and are not counted.
        """
        if self.dialect != "postgresql":
            return None
        stored = sa.func.pg_column_size(sa.literal_column(f"{table.name}.*"))
        return sa.cast((stored + 7) // 8 * 8 + LINE_POINTER_BYTES, sa.BigInteger)

    async def repair_collections(self, connection: AsyncConnection, keys: Iterable[str]) -> CollectionChanges:
        """Point each collection whose latest artifact is gone at the key's newest artifact left, or delete it."""
        keys = sorted(set(keys))
        if not keys:
            return CollectionChanges()
        latest_is_gone = ~sa.exists().where(ARTIFACT.c.id == ARTIFACT_COLLECTION.c.latest_id)
        stale = list(
            (
                await connection.execute(
                    sa.select(ARTIFACT_COLLECTION.c.key).where(
                        self.among(ARTIFACT_COLLECTION.c.key, keys), latest_is_gone
                    )
                )
            ).scalars()
        )
        if not stale:
            return CollectionChanges()
        newest = (
            sa.select(
                ARTIFACT,
                sa.func.row_number()
                .over(partition_by=ARTIFACT.c.key, order_by=(ARTIFACT.c.created.desc(), ARTIFACT.c.id.desc()))
                .label("position"),
            )
            .where(self.among(ARTIFACT.c.key, stale))
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
            .returning(ARTIFACT_COLLECTION.c.key)
        )
        repointed_keys = set(repointed.scalars())
        removed = await connection.execute(
            sa.delete(ARTIFACT_COLLECTION)
            .where(self.among(ARTIFACT_COLLECTION.c.key, stale), latest_is_gone)
            .returning(ARTIFACT_COLLECTION.c.key)
        )
        return CollectionChanges(removed=set(removed.scalars()), repointed=repointed_keys)

    async def collections_of(
        self, connection: AsyncConnection, keys: list[str]
    ) -> dict[str, tuple[UUID, bool]]:
        """The keys' collections: their latest artifact's id and whether it exists."""
        latest_exists = sa.exists().where(ARTIFACT.c.id == ARTIFACT_COLLECTION.c.latest_id)
        rows = await connection.execute(
            sa.select(
                ARTIFACT_COLLECTION.c.key, ARTIFACT_COLLECTION.c.latest_id, latest_exists.label("exists")
            ).where(self.among(ARTIFACT_COLLECTION.c.key, keys))
        )
        return {row.key: (row.latest_id, bool(row.exists)) for row in rows}

    async def artifacts_per_key(self, connection: AsyncConnection, keys: list[str]) -> dict[str, int]:
        rows = await connection.execute(
            sa.select(ARTIFACT.c.key, sa.func.count())
            .where(self.among(ARTIFACT.c.key, keys))
            .group_by(ARTIFACT.c.key)
        )
        return {key: count for key, count in rows}


def _array_of(column: sa.ColumnElement[Any], values: list[Any]) -> sa.BindParameter:
    """`values` as one PostgreSQL array parameter of `column`'s type."""
    item_type = postgresql.UUID(as_uuid=True) if isinstance(column.type, PrefectUuid) else column.type
    return sa.bindparam(None, values, type_=postgresql.ARRAY(item_type))


def first_line(error: sa.exc.DBAPIError) -> str:
    """The database's own message, its first line: what went wrong, without the statement."""
    original = error.orig if error.orig is not None else error
    message = str(original).strip().splitlines()
    return f"{type(original).__name__}: {message[0] if message else 'no message'}"[:300]
