"""The archive's database side: a batch's rows read as PostgreSQL has them, and restored.

Part of the SQL engine (the only modules that write to Prefect's tables). `batch_rows`
reads, inside the batch's transaction and after its runs are locked and judged, every row
the accepted runs' trees own, each as `to_jsonb(row)`: the columns and values exactly as the
database holds them. `restore` puts an archive (`tasks.retention.archive`) back into a
Prefect database on PostgreSQL of the same version, from the SQL engine's files or the API
engine's alike:

    python -m tasks.retention.sql_archive restore <archive URL, path or block> [--flow-run-id ID ...]

into the database of the settings (`MAINTENANCE_DATABASE_URL`...). Each file is one
transaction. A flow run that exists is skipped, with everything it owns, and named in the
summary; so a second restore duplicates nothing. Rows are inserted with
`jsonb_populate_recordset(NULL::<table>, ...)` over the columns the archive and the database
share (a column the archive lacks takes its default). `flow_run.state_id`,
`flow_run.parent_task_run_id` and `task_run.state_id` point at rows inserted after them:
they are set once those exist. A deployment, work queue or infrastructure document that no
longer exists leaves its reference empty; a flow that exists under another id (deleted and
created again) takes the runs. A restored artifact's key gets its collection back if it
has none. Cache rows are not archived (a cache is rebuilt) and events are not restored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.parameters import ParameterError
from tasks.retention.archive import (
    ARCHIVED_TABLES,
    BLOCK_SLUG,
    BatchArchive,
    list_batch_files,
    read_batch_file,
)
from tasks.retention.sql_database import PrefectDatabase

IDS = sa.bindparam("ids", type_=postgresql.ARRAY(postgresql.UUID(as_uuid=True)))

# Which rows of each table a batch's flow runs (`:ids`) own, walked by one loop.
OWNED_BY_RUNS = {
    "flow": "id IN (SELECT flow_id FROM flow_run WHERE id = ANY(:ids))",
    "flow_run": "id = ANY(:ids)",
    "task_run": "flow_run_id = ANY(:ids)",
    "artifact": "flow_run_id = ANY(:ids)",
    "flow_run_state": "flow_run_id = ANY(:ids)",
    "task_run_state": "task_run_id IN (SELECT id FROM task_run WHERE flow_run_id = ANY(:ids))",
    "flow_run_input": "flow_run_id = ANY(:ids)",
    "log": "flow_run_id = ANY(:ids)",
}
# References to rows inserted later in the restore: inserted empty, then set (table, column, target).
DEFERRED_REFERENCES = (
    ("flow_run", "state_id", "flow_run_state"),
    ("flow_run", "parent_task_run_id", "task_run"),
    ("task_run", "state_id", "task_run_state"),
)
# References to rows a restore does not bring back: emptied when the row is gone.
OUTSIDE_REFERENCES = {
    "flow_run": (
        ("deployment_id", "deployment"),
        ("work_queue_id", "work_queue"),
        ("infrastructure_document_id", "block_document"),
    ),
}


async def archive_batch(
    connection: AsyncConnection, dialect: str, archive: BatchArchive, flow_run_ids: list[UUID]
) -> None:
    """Archive (in a dry run: measure) the accepted runs' rows before the batch deletes them."""
    if dialect != "postgresql":
        raise ParameterError(
            "archive_to: archiving with the SQL engine needs PostgreSQL; nothing was deleted"
        )
    if flow_run_ids:
        await archive.keep(await batch_rows(connection, flow_run_ids))


async def batch_rows(connection: AsyncConnection, flow_run_ids: list[UUID]) -> dict[str, list[str]]:
    """Every row the runs own, per table, as the JSON text of `to_jsonb(row)`."""
    rows = {}
    for table in ARCHIVED_TABLES:
        statement = sa.text(f"SELECT to_jsonb(t)::text FROM {table} AS t WHERE {OWNED_BY_RUNS[table]}")
        result = await connection.execute(statement.bindparams(IDS), {"ids": flow_run_ids})
        rows[table] = list(result.scalars())
    return rows


@dataclass
class RestoreResult:
    files: int = 0
    restored: list[UUID] = field(default_factory=list)
    skipped: list[UUID] = field(default_factory=list)
    rows: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        rows = ", ".join(f"{table} {count}" for table, count in sorted(self.rows.items()) if count)
        skipped = (
            f"; skipped {len(self.skipped)} flow runs that exist already: {', '.join(map(str, self.skipped))}"
            if self.skipped
            else ""
        )
        return (
            f"restored {len(self.restored)} flow runs from {self.files} files ({rows or 'no rows'}){skipped}"
        )


async def restore(
    source: str, database_url: str | SecretStr, flow_run_ids: Iterable[UUID] | None = None
) -> RestoreResult:
    """Restore the archive at `source` (every run, or the trees of `flow_run_ids`)."""
    filesystem, paths = await asyncio.to_thread(_batch_files, source)
    if not paths:
        raise ParameterError(f"source: no archive files (*.jsonl.gz) under {source!r}")
    wanted = set(flow_run_ids) if flow_run_ids else None
    database = PrefectDatabase(database_url)
    if database.dialect != "postgresql":
        await database.dispose()
        raise ParameterError("restore needs a Prefect database on PostgreSQL")
    result = RestoreResult()
    try:
        for path in paths:
            rows = read_batch_file(await asyncio.to_thread(filesystem.cat_file, path))
            async with database.transaction(write=True) as connection:
                await _restore_file(connection, rows, wanted, result)
            result.files += 1
    finally:
        await database.dispose()
    return result


def _batch_files(source: str) -> tuple[Any, list[str]]:
    """An archive's files; a storage block is read through its file system and base path."""
    if not BLOCK_SLUG.match(source):
        return list_batch_files(source)
    import prefect.filesystems  # noqa: F401  (registers the core storage blocks)
    from prefect.blocks.core import Block

    block = Block.load(source)
    if not hasattr(block, "basepath"):
        raise ParameterError(f"source: restore reads {source!r} through its URL; give the URL instead")
    return list_batch_files(block.basepath, **(getattr(block, "settings", None) or {}))


def _tree_of(rows: dict[str, list[dict[str, Any]]], roots: set[UUID]) -> set[UUID]:
    """`roots` and, at any depth, their subflows in the archive."""
    run_of_task_run = {
        UUID(task_run["id"]): UUID(task_run["flow_run_id"]) for task_run in rows.get("task_run", ())
    }
    parent_of = {
        UUID(run["id"]): run_of_task_run.get(UUID(run["parent_task_run_id"]))
        for run in rows.get("flow_run", ())
        if run.get("parent_task_run_id")
    }
    tree = set(roots)
    while True:
        more = {child for child, parent in parent_of.items() if parent in tree and child not in tree}
        if not more:
            return tree
        tree |= more


async def _restore_file(
    connection: AsyncConnection,
    rows: dict[str, list[dict[str, Any]]],
    wanted: set[UUID] | None,
    result: RestoreResult,
) -> None:
    archived = {UUID(run["id"]) for run in rows.get("flow_run", ())}
    if wanted is not None:
        archived &= _tree_of(rows, wanted)
    existing = set(
        (
            await connection.execute(
                sa.text("SELECT id FROM flow_run WHERE id = ANY(:ids)").bindparams(IDS),
                {"ids": list(archived)},
            )
        ).scalars()
    )
    runs = archived - existing
    result.skipped += sorted(existing)
    if not runs:
        return
    task_runs = {UUID(row["id"]) for row in rows.get("task_run", ()) if UUID(row["flow_run_id"]) in runs}
    flow_ids = await _restore_flows(connection, rows.get("flow", ()), result)

    def owned(table: str, row: dict[str, Any]) -> bool:
        if table == "flow_run":
            return UUID(row["id"]) in runs
        if table == "task_run_state":
            return UUID(row["task_run_id"]) in task_runs
        return row.get("flow_run_id") is not None and UUID(row["flow_run_id"]) in runs

    deferred: list[tuple[str, str, str, list[dict[str, Any]]]] = []
    for table in ARCHIVED_TABLES[1:]:
        table_rows = [dict(row) for row in rows.get(table, ()) if owned(table, row)]
        if table == "flow_run":
            for row in table_rows:
                row["flow_id"] = str(flow_ids.get(row["flow_id"], row["flow_id"]))
            await _empty_missing_references(connection, table, table_rows)
        for deferred_table, column, target in DEFERRED_REFERENCES:
            if deferred_table == table:
                deferred.append(
                    (table, column, target, [{"id": r["id"], column: r.get(column)} for r in table_rows])
                )
                for row in table_rows:
                    row[column] = None
        result.rows[table] += await _insert(connection, table, table_rows)
    for table, column, target, references in deferred:
        await connection.execute(
            sa.text(
                f"UPDATE {table} SET {column} = reference.{column} "
                f"FROM jsonb_to_recordset(CAST(:references AS jsonb)) AS reference(id uuid, {column} uuid) "
                f"WHERE {table}.id = reference.id AND {table}.{column} IS NULL "
                f"AND EXISTS (SELECT 1 FROM {target} WHERE {target}.id = reference.{column})"
            ),
            {"references": json.dumps(references)},
        )
    result.rows["artifact_collection"] += (
        await connection.execute(
            sa.text(
                "INSERT INTO artifact_collection (key, latest_id, task_run_id, flow_run_id, type, data, "
                "description, metadata_, created, updated) "
                "SELECT DISTINCT ON (key) key, id, task_run_id, flow_run_id, type, data, description, metadata_, "
                "created, updated FROM artifact WHERE flow_run_id = ANY(:ids) AND key IS NOT NULL "
                "ORDER BY key, created DESC, id DESC ON CONFLICT (key) DO NOTHING"
            ).bindparams(IDS),
            {"ids": list(runs)},
        )
    ).rowcount
    result.restored += sorted(runs)


async def _restore_flows(
    connection: AsyncConnection, flows: Sequence[dict[str, Any]], result: RestoreResult
) -> dict[str, UUID]:
    """Insert the flows that are gone; archived flow id -> the id of the flow of that name now."""
    result.rows["flow"] += await _insert(connection, "flow", list(flows))
    names = {row["name"]: row["id"] for row in flows}
    current = await connection.execute(
        sa.text("SELECT name, id FROM flow WHERE name = ANY(:names)").bindparams(
            sa.bindparam("names", type_=postgresql.ARRAY(sa.String))
        ),
        {"names": list(names)},
    )
    return {names[row.name]: row.id for row in current}


async def _empty_missing_references(
    connection: AsyncConnection, table: str, rows: list[dict[str, Any]]
) -> None:
    for column, target in OUTSIDE_REFERENCES.get(table, ()):
        referenced = {row[column] for row in rows if row.get(column)}
        if not referenced:
            continue
        present = {
            str(value)
            for value in (
                await connection.execute(
                    sa.text(f"SELECT id FROM {target} WHERE id = ANY(:ids)").bindparams(IDS),
                    {"ids": [UUID(value) for value in referenced]},
                )
            ).scalars()
        }
        for row in rows:
            if row.get(column) and str(UUID(row[column])) not in present:
                row[column] = None


async def _insert(connection: AsyncConnection, table: str, rows: list[dict[str, Any]]) -> int:
    """Insert `rows` as they are, over the columns they share with the table; existing rows stay."""
    if not rows:
        return 0
    columns = await _columns(connection, table)
    shared = [column for column in columns if any(column in row for row in rows)]
    listed = ", ".join(f'"{column}"' for column in shared)
    inserted = await connection.execute(
        sa.text(
            f"INSERT INTO {table} ({listed}) SELECT {listed} "
            f"FROM jsonb_populate_recordset(NULL::{table}, CAST(:rows AS jsonb)) ON CONFLICT DO NOTHING"
        ),
        {"rows": json.dumps(rows)},
    )
    return inserted.rowcount


async def _columns(connection: AsyncConnection, table: str) -> list[str]:
    result = await connection.execute(
        sa.text(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = :table ORDER BY ordinal_position"
        ),
        {"table": table},
    )
    return list(result.scalars())


def main(argv: Sequence[str] | None = None) -> int:
    from tasks.settings import get_settings

    parser = argparse.ArgumentParser(
        prog="python -m tasks.retention.sql_archive", description="Restore archived flow runs."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    restoring = commands.add_parser("restore", help="bring archived runs back into the configured database")
    restoring.add_argument(
        "source", help="the archive: a URL, a path or a storage block, or one run's folder or file"
    )
    restoring.add_argument(
        "--flow-run-id", action="append", type=UUID, default=[], help="only this run's tree (repeatable)"
    )
    arguments = parser.parse_args(argv)
    database_url = get_settings().database_url
    if database_url is None:
        print("restore: no database URL is configured (MAINTENANCE_DATABASE_URL)", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(restore(arguments.source, database_url, arguments.flow_run_id))
    except ParameterError as error:
        print(f"restore: {error}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
