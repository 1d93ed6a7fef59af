"""What a SQLite-backed Prefect server's database can tell, read-only.

SQLite has no dead tuples, autovacuum, connections, lock table or transaction IDs: its
bloat is free pages in the file (the freelist) and unused bytes inside each table's pages,
and only `VACUUM` (or `auto_vacuum`) gives space back. `dbstat` measures both per table
and index when SQLite was built with it (Python's own build is); without it the report
still has the file's size and its free pages (judged by the catalog's `sqlite_file` check).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.database import describe_error
from tasks.health.bloat import bloat_between
from tasks.health.models import PREFECT_BIG_TABLES, IndexFigures, TableFigures
from tasks.health.statements import rows_of

NOT_APPLICABLE = (
    "SQLite has no dead rows, autovacuum, connection limit, lock table, blocked queries, transaction-ID "
    "wraparound, sequences or pgstattuple: those checks do not apply. Its bloat is free pages in the file "
    "and unused bytes inside pages (measured exactly by dbstat, so `exact` changes nothing here)."
)

SERVER_SQL = """
SELECT sqlite_version() AS server_version,
       (SELECT page_size FROM pragma_page_size) AS page_size,
       (SELECT page_count FROM pragma_page_count) AS page_count,
       (SELECT freelist_count FROM pragma_freelist_count) AS freelist_count,
       (SELECT journal_mode FROM pragma_journal_mode) AS journal_mode
"""

SCHEMA_SQL = """
SELECT type, name, tbl_name AS table_name FROM sqlite_schema
WHERE type IN ('table', 'index') AND name NOT LIKE 'sqlite_%'
ORDER BY name
"""

# One row per b-tree: its pages' bytes and the bytes unused inside them.
DBSTAT_SQL = "SELECT name, pgsize AS bytes, unused FROM dbstat WHERE aggregate = TRUE"


async def read_server(connection: AsyncConnection) -> dict[str, Any]:
    server = (await rows_of(connection, SERVER_SQL))[0]
    server["database_bytes"] = server["page_size"] * server["page_count"]
    return server


async def read_tables_and_indexes(
    connection: AsyncConnection, server: dict[str, Any], notes: list[str]
) -> tuple[list[TableFigures], list[IndexFigures]]:
    schema = await rows_of(connection, SCHEMA_SQL)
    try:
        pages = {row["name"]: row for row in await rows_of(connection, DBSTAT_SQL)}
    except Exception as error:
        notes.append(
            f"Per-table sizes need SQLite's dbstat table, which is missing here ({describe_error(error)})."
        )
        pages = {}
    page_size = server["page_size"]
    indexes = [
        _figures_of(
            IndexFigures(name=row["name"], table=row["table_name"], method="b-tree", bytes=0),
            pages,
            page_size,
        )
        for row in schema
        if row["type"] == "index"
    ]
    tables = []
    for row in schema:
        if row["type"] != "table":
            continue
        name = row["name"]
        quoted = '"' + name.replace('"', '""') + '"'
        live_rows = (await rows_of(connection, f"SELECT count(*) AS rows FROM {quoted}"))[0]["rows"]
        index_bytes = sum(index.bytes for index in indexes if index.table == name)
        table = TableFigures(
            name=name,
            total_bytes=0,
            heap_bytes=0,
            index_bytes=index_bytes,
            live_rows=live_rows,
            rows_method="count",
            prefect_table=name in PREFECT_BIG_TABLES,
        )
        _figures_of(table, pages, page_size)
        table.total_bytes = table.heap_bytes + index_bytes
        tables.append(table)
    tables.sort(key=lambda table: table.total_bytes, reverse=True)
    indexes.sort(key=lambda index: index.bytes, reverse=True)
    return tables, indexes


def _figures_of(figures: TableFigures | IndexFigures, pages: dict[str, dict[str, Any]], page_size: int):
    """Fill size and measured bloat (unused bytes in the b-tree's pages) from dbstat."""
    row = pages.get(figures.name)
    if row is None:
        return figures
    if isinstance(figures, TableFigures):
        figures.heap_bytes = row["bytes"]
    else:
        figures.bytes = row["bytes"]
    figures.record_bloat(bloat_between(row["bytes"], row["bytes"] - row["unused"], page_size), "dbstat")
    return figures
