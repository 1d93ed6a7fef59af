"""What PostgreSQL can tell about its own health, read-only.

`survey` reads the server's settings and one row per table and per index (sizes, row
counts, vacuum times, and the inputs of the bloat estimate) and turns them into
`TableFigures` / `IndexFigures`. Where exact figures are cheap they replace the estimates:
`count_small_table` counts a table too small to cost anything to read (pgstattuple: live
rows, dead rows and bloat; count(*) when pgstattuple is not installed), and
`confirm_with_pgstattuple` measures, when asked, the big tables worth the extra I/O. The
checks' own SQL is in the catalog (`tasks.health.checks`), beside each check.

Everything here only reads catalogs and statistics views. A role with `pg_monitor`
(statistics of every session, and EXECUTE on pgstattuple through `pg_stat_scan_tables`) and
SELECT on Prefect's tables (the planner statistics behind the estimate are only visible to
roles that may read the columns) sees all of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.health.bloat import (
    DEFAULT_BTREE_FILLFACTOR,
    estimate_btree_bloat,
    estimate_table_bloat,
    measured_table_bloat,
)
from tasks.health.models import PREFECT_BIG_TABLES, IndexFigures, TableFigures
from tasks.health.statements import rows_of

SERVER_SQL = """
SELECT current_setting('server_version') AS server_version,
       current_setting('block_size')::int AS block_size,
       pg_database_size(current_database()) AS database_bytes,
       current_setting('autovacuum') = 'on' AS autovacuum,
       current_setting('track_counts') = 'on' AS track_counts,
       current_setting('autovacuum_vacuum_threshold')::float8 AS vacuum_threshold,
       current_setting('autovacuum_vacuum_scale_factor')::float8 AS vacuum_scale_factor,
       database.deadlocks,
       coalesce(database.stats_reset, pg_postmaster_start_time()) AS statistics_since,
       (SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'pgstattuple')
           AS pgstattuple_schema
FROM pg_stat_database AS database
WHERE database.datname = current_database()
"""

# One row per table: sizes, activity counters, and the planner statistics the bloat
# estimate needs (row count and the average width of each column, NULLs discounted).
TABLES_SQL = """
WITH column_statistics AS MATERIALIZED (
    SELECT schemaname, tablename, attname, null_frac, avg_width FROM pg_stats
    WHERE NOT inherited AND schemaname NOT IN ('pg_catalog', 'information_schema')
)
SELECT c.oid,
       CASE WHEN n.nspname = 'public' THEN quote_ident(c.relname)
            ELSE quote_ident(n.nspname) || '.' || quote_ident(c.relname) END AS name,
       c.relname AS bare_name,
       quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS qualified_name,
       pg_total_relation_size(c.oid) AS total_bytes,
       pg_relation_size(c.oid) AS heap_bytes,
       pg_indexes_size(c.oid) AS index_bytes,
       coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0) AS toast_bytes,
       c.relpages AS heap_pages,
       c.reltuples AS estimated_rows,
       nullif(c.reltoastrelid, 0) AS toast_oid,
       coalesce(toast.relpages, 0) AS toast_pages,
       greatest(coalesce(toast.reltuples, 0), 0) AS toast_rows,
       options.fillfactor,
       options.autovacuum_enabled,
       options.vacuum_threshold,
       options.vacuum_scale_factor,
       activity.n_live_tup AS live_rows,
       activity.n_dead_tup AS dead_rows,
       activity.n_ins_since_vacuum AS inserted_since_vacuum,
       activity.last_vacuum,
       activity.last_autovacuum,
       activity.last_analyze,
       activity.last_autoanalyze,
       widths.columns,
       widths.columns_with_statistics,
       widths.data_width,
       widths.has_nulls
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
LEFT JOIN pg_class AS toast ON toast.oid = c.reltoastrelid
LEFT JOIN pg_stat_all_tables AS activity ON activity.relid = c.oid
CROSS JOIN LATERAL (
    SELECT coalesce(max(option_value) FILTER (WHERE option_name = 'fillfactor'), '100')::int AS fillfactor,
           coalesce(max(option_value) FILTER (WHERE option_name = 'autovacuum_enabled'), 'on')::bool
               AS autovacuum_enabled,
           max(option_value) FILTER (WHERE option_name = 'autovacuum_vacuum_threshold')::float8
               AS vacuum_threshold,
           max(option_value) FILTER (WHERE option_name = 'autovacuum_vacuum_scale_factor')::float8
               AS vacuum_scale_factor
    FROM pg_options_to_table(c.reloptions)
) AS options
CROSS JOIN LATERAL (
    SELECT count(*) AS columns,
           count(s.attname) AS columns_with_statistics,
           coalesce(sum((1 - coalesce(s.null_frac, 0)) * coalesce(s.avg_width, 0)), 0) AS data_width,
           coalesce(bool_or(s.null_frac > 0), false) AS has_nulls
    FROM pg_attribute AS a
    LEFT JOIN column_statistics AS s
      ON s.schemaname = n.nspname AND s.tablename = c.relname AND s.attname = a.attname
    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
) AS widths
WHERE c.relkind IN ('r', 'm')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_(toast|temp_)'
ORDER BY total_bytes DESC
"""

# One row per index. Statistics of a plain column are the table's; those of an expression
# are kept under the index's own name.
INDEXES_SQL = """
WITH column_statistics AS MATERIALIZED (
    SELECT schemaname, tablename, attname, null_frac, avg_width FROM pg_stats
    WHERE NOT inherited AND schemaname NOT IN ('pg_catalog', 'information_schema')
)
SELECT CASE WHEN n.nspname = 'public' THEN quote_ident(ci.relname)
            ELSE quote_ident(n.nspname) || '.' || quote_ident(ci.relname) END AS name,
       CASE WHEN n.nspname = 'public' THEN quote_ident(ct.relname)
            ELSE quote_ident(n.nspname) || '.' || quote_ident(ct.relname) END AS table_name,
       am.amname AS method,
       pg_relation_size(i.indexrelid) AS bytes,
       ci.relpages AS pages,
       ci.reltuples AS estimated_rows,
       i.indisunique AS is_unique,
       i.indisvalid AS valid,
       EXISTS (SELECT 1 FROM pg_constraint AS k WHERE k.conindid = i.indexrelid) AS backs_constraint,
       usage.idx_scan AS scans,
       coalesce((SELECT option_value FROM pg_options_to_table(ci.reloptions)
                 WHERE option_name = 'fillfactor')::int, :btree_fillfactor) AS fillfactor,
       widths.columns,
       widths.columns_with_statistics,
       widths.data_width,
       widths.has_nulls
FROM pg_index AS i
JOIN pg_class AS ci ON ci.oid = i.indexrelid
JOIN pg_class AS ct ON ct.oid = i.indrelid
JOIN pg_namespace AS n ON n.oid = ct.relnamespace
JOIN pg_am AS am ON am.oid = ci.relam
LEFT JOIN pg_stat_all_indexes AS usage ON usage.indexrelid = i.indexrelid
CROSS JOIN LATERAL (
    SELECT count(*) AS columns,
           count(s.attname) AS columns_with_statistics,
           coalesce(sum((1 - coalesce(s.null_frac, 0)) * coalesce(s.avg_width, 0)), 0) AS data_width,
           coalesce(bool_or(s.null_frac > 0), false) AS has_nulls
    FROM pg_attribute AS a
    LEFT JOIN column_statistics AS s
      ON s.schemaname = n.nspname AND s.attname = a.attname
     AND s.tablename = CASE WHEN i.indkey[a.attnum - 1] = 0 THEN ci.relname ELSE ct.relname END
    WHERE a.attrelid = i.indexrelid
) AS widths
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_(toast|temp_)'
ORDER BY bytes DESC
"""

# pgstattuple_approx skips pages the visibility map says are all-visible (their free space
# comes from the free space map), so it reads only what vacuum has not yet cleaned: its dead
# rows are counted, its live rows on skipped pages estimated. pgstattuple reads every page
# and counts both.
PGSTATTUPLE_SQL = {
    "pgstattuple_approx": """
        SELECT table_len AS relation_bytes, approx_tuple_count AS live_tuples,
               approx_tuple_len AS live_tuple_bytes, dead_tuple_count AS dead_tuples
        FROM {schema}.pgstattuple_approx(CAST(:oid AS oid))
    """,
    "pgstattuple": """
        SELECT table_len AS relation_bytes, tuple_count AS live_tuples,
               tuple_len AS live_tuple_bytes, dead_tuple_count AS dead_tuples
        FROM {schema}.pgstattuple(CAST(CAST(:oid AS oid) AS regclass))
    """,
}
PgstattupleFunction = Literal["pgstattuple_approx", "pgstattuple"]

COUNT_SQL = "SELECT count(*) AS live_rows FROM {table}"


async def read_server(connection: AsyncConnection) -> dict[str, Any]:
    return (await rows_of(connection, SERVER_SQL))[0]


@dataclass(frozen=True)
class TableStorage:
    """Where a table's bytes live, for pgstattuple: its oid, its TOAST table's, its fillfactor;
    and its schema-qualified name, for count(*)."""

    oid: int
    toast_oid: int | None
    fillfactor: int
    qualified_name: str


async def read_tables(
    connection: AsyncConnection, server: dict[str, Any]
) -> tuple[list[TableFigures], dict[str, TableStorage]]:
    rows = await rows_of(connection, TABLES_SQL)
    storage = {
        row["name"]: TableStorage(row["oid"], row["toast_oid"], row["fillfactor"], row["qualified_name"])
        for row in rows
    }
    return [_table_figures(row, server) for row in rows], storage


async def read_indexes(connection: AsyncConnection, server: dict[str, Any]) -> list[IndexFigures]:
    rows = await rows_of(connection, INDEXES_SQL, {"btree_fillfactor": DEFAULT_BTREE_FILLFACTOR})
    return [_index_figures(row, server) for row in rows]


async def confirm_with_pgstattuple(
    connection: AsyncConnection, table: TableFigures, storage: TableStorage, server: dict[str, Any]
) -> None:
    """Replace the table's estimates by the pgstattuple_approx figures (heap and TOAST)."""
    await _measure(connection, table, storage, server, "pgstattuple_approx")


async def count_small_table(
    connection: AsyncConnection, table: TableFigures, storage: TableStorage, server: dict[str, Any]
) -> None:
    """Exact rows (and, with pgstattuple, exact dead rows and bloat) of a table small enough
    that reading all of it costs nothing."""
    if server["pgstattuple_schema"] is not None:
        await _measure(connection, table, storage, server, "pgstattuple")
        return
    statement = COUNT_SQL.format(table=storage.qualified_name)
    live = (await rows_of(connection, statement))[0]["live_rows"]
    table.record_rows(live, table.dead_rows, "count")


async def _measure(
    connection: AsyncConnection,
    table: TableFigures,
    storage: TableStorage,
    server: dict[str, Any],
    function: PgstattupleFunction,
) -> None:
    statement = PGSTATTUPLE_SQL[function].format(schema=server["pgstattuple_schema"])
    measured = [
        ((await rows_of(connection, statement, {"oid": oid}))[0], relation_fillfactor)
        for oid, relation_fillfactor in ((storage.oid, storage.fillfactor), (storage.toast_oid, 100))
        if oid is not None
    ]
    relations = [
        (int(row["relation_bytes"]), int(row["live_tuples"]), int(row["live_tuple_bytes"]), fillfactor)
        for row, fillfactor in measured
    ]
    table.estimated_bloat_percent = table.bloat_percent
    table.record_bloat(measured_table_bloat(block_size=server["block_size"], relations=relations), function)
    heap = measured[0][0]
    table.record_rows(int(heap["live_tuples"]), int(heap["dead_tuples"]), function)


def _table_figures(row: dict[str, Any], server: dict[str, Any]) -> TableFigures:
    live, dead = row["live_rows"], row["dead_rows"]
    figures = TableFigures(
        name=row["name"],
        total_bytes=row["total_bytes"],
        heap_bytes=row["heap_bytes"],
        index_bytes=row["index_bytes"],
        toast_bytes=row["toast_bytes"],
        last_vacuum=row["last_vacuum"],
        last_autovacuum=row["last_autovacuum"],
        last_analyze=row["last_analyze"],
        last_autoanalyze=row["last_autoanalyze"],
        autovacuum_enabled=row["autovacuum_enabled"],
        changes_since_vacuum=(dead or 0) + (row["inserted_since_vacuum"] or 0) if live is not None else None,
        prefect_table=row["bare_name"] in PREFECT_BIG_TABLES,
    )
    figures.record_rows(live, dead, "statistics")
    # Autovacuum's own trigger: dead rows above threshold + scale factor x rows.
    threshold = row["vacuum_threshold"] if row["vacuum_threshold"] is not None else server["vacuum_threshold"]
    scale = (
        row["vacuum_scale_factor"]
        if row["vacuum_scale_factor"] is not None
        else server["vacuum_scale_factor"]
    )
    figures.vacuum_due = dead is not None and dead > threshold + scale * max(row["estimated_rows"], 0)
    if _has_statistics(row):
        estimate = estimate_table_bloat(
            block_size=server["block_size"],
            heap_pages=row["heap_pages"],
            toast_pages=row["toast_pages"],
            rows=row["estimated_rows"],
            toast_rows=row["toast_rows"],
            columns=row["columns"],
            data_width=float(row["data_width"]),
            has_nulls=row["has_nulls"],
            fillfactor=row["fillfactor"],
        )
        figures.record_bloat(estimate, "estimate")
    return figures


def _index_figures(row: dict[str, Any], server: dict[str, Any]) -> IndexFigures:
    figures = IndexFigures(
        name=row["name"],
        table=row["table_name"],
        method=row["method"],
        bytes=row["bytes"],
        scans=row["scans"],
        unique=row["is_unique"] or row["backs_constraint"],
        valid=row["valid"],
    )
    if row["method"] == "btree" and row["pages"] > 0 and _has_statistics(row):
        estimate = estimate_btree_bloat(
            block_size=server["block_size"],
            pages=row["pages"],
            rows=row["estimated_rows"],
            data_width=float(row["data_width"]),
            has_nulls=row["has_nulls"],
            fillfactor=row["fillfactor"],
        )
        figures.record_bloat(estimate, "estimate")
    return figures


def _has_statistics(row: dict[str, Any]) -> bool:
    """reltuples is -1 until the first VACUUM or ANALYZE, and pg_stats shows a column only to
    roles that may read it: without both there is no estimate."""
    return (
        row["estimated_rows"] >= 0 and row["columns"] > 0 and row["columns_with_statistics"] == row["columns"]
    )
