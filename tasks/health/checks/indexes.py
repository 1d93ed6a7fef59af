"""Checks on indexes: B-tree bloat, indexes never scanned, duplicates, invalid leftovers of a
failed concurrent build, and foreign keys no index leads (each delete on the referenced table
then scans the referencing one).

Bloat, scans and validity come from the per-index figures the survey already took
(`each_index`); duplicates and foreign keys are asked of the catalogs.
"""

from __future__ import annotations

from tasks.health.framework import AboveThreshold, Check, EveryRow, HealthContext, Row, each_index, sql
from tasks.health.models import IndexFigures
from tasks.reports import human_bytes


def _bloated_index(index: IndexFigures, context: HealthContext) -> Row | None:
    if index.bloat_percent is None or index.bytes < context.thresholds.minimum_bytes:
        return None
    return {"object": index.name, "value": index.bloat_percent, "wasted": human_bytes(index.bloat_bytes)}


INDEX_BLOAT = Check(
    "index_bloat",
    "B-tree index bloat",
    each_index(_bloated_index),
    AboveThreshold("index_bloat_percent"),
    "{wasted} wasted (estimate). REINDEX INDEX CONCURRENTLY {object};",
    unit="%",
    shows="{value} bloat (estimate)",
)


def _unused_index(index: IndexFigures, context: HealthContext) -> Row | None:
    if index.scans != 0 or index.unique or index.bytes < context.thresholds.minimum_bytes:
        return None
    if _is_prefect_index(index):
        # Prefect's own queries need it the day its feature is used; dropping it is not advice.
        return None
    since = context.server.get("statistics_since")
    return {
        "object": index.name,
        "value": index.bytes,
        "table": index.table,
        "since": since.isoformat(timespec="minutes") if since else "-",
    }


def _is_prefect_index(index: IndexFigures) -> bool:
    """Named by Prefect's naming convention (ix_/uq_/pk_/trgm_ix_ + its table's name)."""
    return index.name.startswith(
        tuple(f"{prefix}{index.table}" for prefix in ("ix_", "uq_", "pk_", "trgm_ix_"))
    )


UNUSED_INDEXES = Check(
    "unused_indexes",
    "Unused indexes",
    each_index(_unused_index),
    EveryRow("info"),
    "Never scanned since {since}, yet every write to {table} maintains it. If that period is "
    "representative: DROP INDEX CONCURRENTLY {object};",
    unit="bytes",
    shows="{value} index, 0 scans",
)

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

DUPLICATE_INDEXES = Check(
    "duplicate_indexes",
    "Duplicate indexes",
    sql(DUPLICATE_INDEXES_SQL),
    EveryRow("warning"),
    "Identical to {twin}: DROP INDEX CONCURRENTLY {object};",
    unit="bytes",
    shows="{value} index",
)


def _invalid_index(index: IndexFigures, context: HealthContext) -> Row | None:
    return None if index.valid else {"object": index.name, "value": index.bytes, "table": index.table}


INVALID_INDEXES = Check(
    "invalid_indexes",
    "Invalid indexes",
    each_index(_invalid_index),
    EveryRow("warning"),
    "Left behind by a failed CREATE INDEX CONCURRENTLY: maintained on every write to {table}, never "
    "used. REINDEX INDEX CONCURRENTLY {object}; (or DROP INDEX CONCURRENTLY {object};)",
    unit="bytes",
    shows="{value} index",
)

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

FOREIGN_KEYS_WITHOUT_INDEX = Check(
    "foreign_keys_without_index",
    "Foreign keys without an index",
    sql(FOREIGN_KEYS_WITHOUT_INDEX_SQL),
    EveryRow("info"),
    "Deleting from {referenced_table} scans {table_name} for each row: "
    "CREATE INDEX CONCURRENTLY {index_name} ON {table_name} ({columns});",
    unit="bytes",
    shows="{value} table",
)

CHECKS = (INDEX_BLOAT, UNUSED_INDEXES, DUPLICATE_INDEXES, INVALID_INDEXES, FOREIGN_KEYS_WITHOUT_INDEX)
