"""What PostgreSQL can tell about its own health, read-only.

`survey` reads the server's settings and one row per table and per index (sizes, row
counts, vacuum times, and the inputs of the bloat estimate) and turns them into
`TableFigures` / `IndexFigures`; `confirm_with_pgstattuple` replaces the estimate by a
measured figure for the tables worth the extra I/O. The SQL of the individual checks lives
here too, next to the survey it complements.

Everything here only reads catalogs and statistics views. A role with `pg_monitor`
(statistics of every session, and EXECUTE on pgstattuple through `pg_stat_scan_tables`) and
SELECT on Prefect's tables (the planner statistics behind the estimate are only visible to
roles that may read the columns) sees all of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
# comes from the free space map), so it reads only what vacuum has not yet cleaned.
PGSTATTUPLE_SQL = """
SELECT table_len AS relation_bytes, approx_tuple_count AS live_tuples, approx_tuple_len AS live_tuple_bytes
FROM {schema}.pgstattuple_approx(CAST(:oid AS oid))
"""

# --- The checks' own SQL. Each returns `object` and `value`, plus what its advice names.

AUTOVACUUM_SERVER_SQL = """
SELECT name AS object, setting AS value
FROM pg_settings
WHERE name IN ('autovacuum', 'track_counts') AND setting <> 'on'
"""

CONNECTIONS_SQL = """
SELECT 'max_connections' AS object,
       round(100.0 * count(*) / current_setting('max_connections')::int, 1)::float8 AS value,
       count(*) AS connections,
       current_setting('max_connections')::int AS max_connections
FROM pg_stat_activity
WHERE backend_type = 'client backend'
"""

CONNECTIONS_BY_CLIENT_SQL = """
SELECT coalesce(datname, '-') || ' / ' || coalesce(usename, '-') || ' / '
           || coalesce(nullif(application_name, ''), '-') AS object,
       count(*) AS value,
       count(*) FILTER (WHERE state = 'active') AS active,
       count(*) FILTER (WHERE state = 'idle') AS idle,
       count(*) FILTER (WHERE state LIKE 'idle in transaction%') AS idle_in_transaction
FROM pg_stat_activity
WHERE backend_type = 'client backend'
GROUP BY datname, usename, application_name
ORDER BY value DESC
LIMIT 20
"""

# Query texts are cut short, and literal passwords (ALTER ROLE ... PASSWORD '...') masked.
_QUERY_TEXT = "regexp_replace(left({column}, 200), '(?i)(password\\s*)''[^'']*''', '\\1''***''', 'g')"

IDLE_IN_TRANSACTION_SQL = f"""
SELECT 'pid ' || pid AS object,
       pid,
       round(extract(epoch FROM now() - state_change)::numeric, 1)::float8 AS value,
       coalesce(usename, '-') AS user_name,
       coalesce(nullif(application_name, ''), '-') AS application,
       {_QUERY_TEXT.format(column="query")} AS last_query
FROM pg_stat_activity
WHERE state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()
ORDER BY value DESC
LIMIT 50
"""

# pg_locks.waitstart says when the wait began; pg_blocking_pids who is in the way.
BLOCKED_QUERIES_SQL = f"""
SELECT 'pid ' || waiting.pid AS object,
       waiting.pid,
       round(extract(epoch FROM now() - coalesce(lock_wait.since, waiting.query_start))::numeric, 1)::float8
           AS value,
       array_to_string(pg_blocking_pids(waiting.pid), ', ') AS blocking_pids,
       (pg_blocking_pids(waiting.pid))[1] AS first_blocking_pid,
       {_QUERY_TEXT.format(column="waiting.query")} AS query,
       coalesce((SELECT {_QUERY_TEXT.format(column="blocker.query")} || ' (' || blocker.state || ')'
                 FROM pg_stat_activity AS blocker
                 WHERE blocker.pid = (pg_blocking_pids(waiting.pid))[1]), '-') AS blocking_query
FROM pg_stat_activity AS waiting
LEFT JOIN LATERAL (
    SELECT min(waitstart) AS since FROM pg_locks WHERE pid = waiting.pid AND NOT granted
) AS lock_wait ON true
WHERE waiting.wait_event_type = 'Lock' AND cardinality(pg_blocking_pids(waiting.pid)) > 0
ORDER BY value DESC
LIMIT 50
"""

LONG_TRANSACTIONS_SQL = f"""
SELECT 'pid ' || pid AS object,
       pid,
       round(extract(epoch FROM now() - xact_start)::numeric, 1)::float8 AS value,
       state,
       coalesce(usename, '-') AS user_name,
       coalesce(nullif(application_name, ''), '-') AS application,
       {_QUERY_TEXT.format(column="query")} AS query
FROM pg_stat_activity
WHERE xact_start IS NOT NULL
  AND pid <> pg_backend_pid()
  AND backend_type = 'client backend'
  AND state NOT LIKE 'idle in transaction%'
ORDER BY value DESC
LIMIT 50
"""

LOCKS_SQL = """
SELECT locks.mode AS object,
       count(*) AS value,
       count(*) FILTER (WHERE NOT locks.granted) AS waiting,
       string_agg(DISTINCT coalesce(nullif(activity.application_name, ''), activity.backend_type, '-'), ', ')
           AS held_by
FROM pg_locks AS locks
LEFT JOIN pg_stat_activity AS activity ON activity.pid = locks.pid
WHERE locks.pid <> pg_backend_pid()
GROUP BY locks.mode
ORDER BY value DESC
"""

XMIN_HOLDERS_SQL = """
SELECT object, kind, value, held_since FROM (
    SELECT 'pid ' || pid AS object, 'session' AS kind, age(backend_xmin) AS value, xact_start AS held_since
    FROM pg_stat_activity WHERE backend_xmin IS NOT NULL AND pid <> pg_backend_pid()
    UNION ALL
    SELECT 'replication slot ' || slot_name, 'replication slot', greatest(age(xmin), age(catalog_xmin)), NULL
    FROM pg_replication_slots WHERE xmin IS NOT NULL OR catalog_xmin IS NOT NULL
    UNION ALL
    SELECT 'prepared transaction ' || gid, 'prepared transaction', age(transaction), prepared
    FROM pg_prepared_xacts
) AS holders
ORDER BY value DESC
LIMIT 10
"""

INACTIVE_SLOTS_SQL = """
SELECT 'replication slot ' || slot_name AS object,
       slot_name,
       greatest(age(xmin), age(catalog_xmin)) AS value
FROM pg_replication_slots
WHERE NOT active AND (xmin IS NOT NULL OR catalog_xmin IS NOT NULL)
"""

PREPARED_TRANSACTIONS_SQL = """
SELECT 'prepared transaction ' || gid AS object,
       gid,
       round(extract(epoch FROM now() - prepared)::numeric, 1)::float8 AS value
FROM pg_prepared_xacts
"""

# Wraparound is per cluster: every database that accepts connections counts.
WRAPAROUND_SQL = """
WITH oldest AS (
    SELECT string_agg(name, ', ') AS tables FROM (
        SELECT c.oid::regclass::text AS name FROM pg_class AS c
        WHERE c.relkind IN ('r', 'm', 't') AND c.relfrozenxid <> '0'
        ORDER BY age(c.relfrozenxid) DESC LIMIT 3
    ) AS top
)
SELECT d.datname || ' (transaction IDs)' AS object,
       round(100.0 * age(d.datfrozenxid) / current_setting('autovacuum_freeze_max_age')::numeric, 1)::float8
           AS value,
       age(d.datfrozenxid) AS age,
       CASE WHEN d.datname = current_database() THEN oldest.tables ELSE 'the oldest tables of ' || d.datname
       END AS oldest_tables
FROM pg_database AS d CROSS JOIN oldest
WHERE d.datallowconn
UNION ALL
SELECT d.datname || ' (multixact IDs)',
       round(100.0 * mxid_age(d.datminmxid)
             / current_setting('autovacuum_multixact_freeze_max_age')::numeric, 1)::float8,
       mxid_age(d.datminmxid),
       CASE WHEN d.datname = current_database() THEN oldest.tables ELSE 'the oldest tables of ' || d.datname END
FROM pg_database AS d CROSS JOIN oldest
WHERE d.datallowconn
ORDER BY value DESC
"""

# A sequence feeding an integer column runs out at the column's maximum, not its own.
SEQUENCES_SQL = """
SELECT quote_ident(s.schemaname) || '.' || quote_ident(s.sequencename) AS object,
       round(100.0 * s.last_value / limits.maximum, 2)::float8 AS value,
       s.last_value,
       limits.maximum
FROM pg_sequences AS s
LEFT JOIN LATERAL (
    SELECT a.atttypid::regtype::text AS column_type
    FROM pg_depend AS d
    JOIN pg_attribute AS a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
    WHERE d.objid = (quote_ident(s.schemaname) || '.' || quote_ident(s.sequencename))::regclass
      AND d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
    LIMIT 1
) AS owner ON true
CROSS JOIN LATERAL (
    SELECT least(s.max_value, CASE owner.column_type WHEN 'smallint' THEN 32767
                                                     WHEN 'integer' THEN 2147483647
                                                     ELSE s.max_value END)::numeric AS maximum
) AS limits
WHERE s.last_value IS NOT NULL AND s.increment_by > 0
ORDER BY value DESC
LIMIT 20
"""

DUPLICATE_INDEXES_SQL = """
SELECT CASE WHEN keep_second THEN first_name ELSE second_name END AS object,
       CASE WHEN keep_second THEN second_name ELSE first_name END AS twin,
       bytes AS value
FROM (
    SELECT a.indexrelid::regclass::text AS first_name,
           b.indexrelid::regclass::text AS second_name,
           pg_relation_size(a.indexrelid) AS bytes,
           EXISTS (SELECT 1 FROM pg_constraint WHERE conindid = b.indexrelid) AS keep_second
    FROM pg_index AS a
    JOIN pg_index AS b
      ON a.indrelid = b.indrelid AND a.indexrelid > b.indexrelid
     AND a.indkey::text = b.indkey::text AND a.indclass::text = b.indclass::text
     AND a.indcollation::text = b.indcollation::text
     AND a.indoption::text = b.indoption::text AND a.indisunique = b.indisunique
     AND coalesce(pg_get_expr(a.indexprs, a.indrelid), '') = coalesce(pg_get_expr(b.indexprs, b.indrelid), '')
     AND coalesce(pg_get_expr(a.indpred, a.indrelid), '') = coalesce(pg_get_expr(b.indpred, b.indrelid), '')
    JOIN pg_class AS ca ON ca.oid = a.indexrelid
    JOIN pg_class AS cb ON cb.oid = b.indexrelid AND cb.relam = ca.relam
    JOIN pg_class AS t ON t.oid = a.indrelid
    WHERE t.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
) AS pairs
ORDER BY value DESC
"""

# A foreign key whose columns do not lead some index makes every delete on the referenced
# table scan the referencing one (retention deletes runs; this is what would slow it down).
FOREIGN_KEYS_WITHOUT_INDEX_SQL = """
SELECT k.conrelid::regclass::text || ' (' || columns.names || ')' AS object,
       k.conrelid::regclass::text AS table_name,
       columns.names AS columns,
       k.confrelid::regclass::text AS referenced_table,
       'ix_' || replace(k.conrelid::regclass::text, '.', '_') || '__' || replace(columns.names, ', ', '_')
           AS index_name,
       pg_total_relation_size(k.conrelid) AS value
FROM pg_constraint AS k
CROSS JOIN LATERAL (
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY key.position) AS names
    FROM unnest(k.conkey) WITH ORDINALITY AS key(attnum, position)
    JOIN pg_attribute AS a ON a.attrelid = k.conrelid AND a.attnum = key.attnum
) AS columns
WHERE k.contype = 'f'
  AND k.connamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
  AND pg_total_relation_size(k.conrelid) >= :minimum_bytes
  AND NOT EXISTS (
      SELECT 1 FROM pg_index AS i
      WHERE i.indrelid = k.conrelid AND i.indpred IS NULL
        AND (string_to_array(i.indkey::text, ' ')::int2[])[1:cardinality(k.conkey)] @> k.conkey
        AND (string_to_array(i.indkey::text, ' ')::int2[])[1:cardinality(k.conkey)] <@ k.conkey
  )
ORDER BY value DESC
"""

DEADLOCKS_SQL = """
SELECT current_database() AS object, deadlocks, coalesce(stats_reset, pg_postmaster_start_time()) AS since
FROM pg_stat_database WHERE datname = current_database()
"""


async def read_server(connection: AsyncConnection) -> dict[str, Any]:
    return (await rows_of(connection, SERVER_SQL))[0]


@dataclass(frozen=True)
class TableStorage:
    """Where a table's bytes live, for pgstattuple: its oid, its TOAST table's, its fillfactor."""

    oid: int
    toast_oid: int | None
    fillfactor: int


async def read_tables(
    connection: AsyncConnection, server: dict[str, Any]
) -> tuple[list[TableFigures], dict[str, TableStorage]]:
    rows = await rows_of(connection, TABLES_SQL)
    storage = {row["name"]: TableStorage(row["oid"], row["toast_oid"], row["fillfactor"]) for row in rows}
    return [_table_figures(row, server) for row in rows], storage


async def read_indexes(connection: AsyncConnection, server: dict[str, Any]) -> list[IndexFigures]:
    rows = await rows_of(connection, INDEXES_SQL, {"btree_fillfactor": DEFAULT_BTREE_FILLFACTOR})
    return [_index_figures(row, server) for row in rows]


async def confirm_with_pgstattuple(
    connection: AsyncConnection, table: TableFigures, storage: TableStorage, server: dict[str, Any]
) -> None:
    """Replace the table's estimate by the pgstattuple_approx figure (heap and TOAST)."""
    statement = PGSTATTUPLE_SQL.format(schema=server["pgstattuple_schema"])
    relations = []
    for oid, relation_fillfactor in ((storage.oid, storage.fillfactor), (storage.toast_oid, 100)):
        if oid is None:
            continue
        row = (await rows_of(connection, statement, {"oid": oid}))[0]
        relations.append(
            (
                int(row["relation_bytes"]),
                int(row["live_tuples"]),
                int(row["live_tuple_bytes"]),
                relation_fillfactor,
            )
        )
    table.estimated_bloat_percent = table.bloat_percent
    table.record_bloat(
        measured_table_bloat(block_size=server["block_size"], relations=relations), "pgstattuple_approx"
    )


def _table_figures(row: dict[str, Any], server: dict[str, Any]) -> TableFigures:
    live, dead = row["live_rows"], row["dead_rows"]
    figures = TableFigures(
        name=row["name"],
        total_bytes=row["total_bytes"],
        heap_bytes=row["heap_bytes"],
        index_bytes=row["index_bytes"],
        toast_bytes=row["toast_bytes"],
        live_rows=live,
        dead_rows=dead,
        dead_percent=round(100.0 * dead / (live + dead), 1) if live is not None and live + dead > 0 else None,
        last_vacuum=row["last_vacuum"],
        last_autovacuum=row["last_autovacuum"],
        last_analyze=row["last_analyze"],
        last_autoanalyze=row["last_autoanalyze"],
        autovacuum_enabled=row["autovacuum_enabled"],
        changes_since_vacuum=(dead or 0) + (row["inserted_since_vacuum"] or 0) if live is not None else None,
        prefect_table=row["bare_name"] in PREFECT_BIG_TABLES,
    )
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
