"""Checks on tables and their vacuum: bloat, dead rows, autovacuum switched off (for the server
or one table), active tables autovacuum has not visited, and tables past its threshold.

All but one read the per-table figures the survey already took (`each_table`); only whether
autovacuum runs at all is asked of the server's settings.
"""

from __future__ import annotations

from tasks.health.framework import (
    AboveThreshold,
    Check,
    EveryRow,
    HealthContext,
    Row,
    each_table,
    sql,
)
from tasks.health.models import TableFigures
from tasks.reports import human_bytes

_VACUUM_ADVICE = (
    "VACUUM (ANALYZE) {object}; makes the space reusable. To give it back to the disk: pg_repack, or "
    "VACUUM (FULL, ANALYZE) {object}; in a maintenance window (it locks the table; never in business hours)."
)


def _bloated_table(table: TableFigures, context: HealthContext) -> Row | None:
    if table.bloat_percent is None or table.total_bytes < context.thresholds.minimum_bytes:
        return None
    return {
        "object": table.name,
        "value": table.bloat_percent,
        "wasted": human_bytes(table.bloat_bytes),
        "method": table.bloat_method,
    }


TABLE_BLOAT = Check(
    "table_bloat",
    "Table bloat",
    each_table(_bloated_table),
    AboveThreshold("table_bloat_percent"),
    {
        "postgresql": "{wasted} wasted ({method}). " + _VACUUM_ADVICE,
        "sqlite": "{wasted} unused inside its pages (dbstat). VACUUM; rewrites the file compactly "
        "(stop the Prefect server first; it needs free disk about the size of the file).",
    },
    unit="%",
    shows="{value} bloat",
    backends=("postgresql", "sqlite"),
)


def _table_with_dead_rows(table: TableFigures, context: HealthContext) -> Row | None:
    if table.dead_percent is None or table.total_bytes < context.thresholds.minimum_bytes:
        return None
    return {
        "object": table.name,
        "value": table.dead_percent,
        "dead_rows": f"{table.dead_rows:,}" if table.dead_rows is not None else "-",
        "counted": "counted" if table.dead_rows_exact else f"estimate of {table.rows_method}",
    }


DEAD_TUPLES = Check(
    "dead_tuples",
    "Dead rows",
    each_table(_table_with_dead_rows),
    AboveThreshold("dead_tuple_percent"),
    "Dead rows: {dead_rows} ({counted}). VACUUM (ANALYZE) {object}; and see what keeps autovacuum "
    "behind (long transactions hold the xmin horizon: see 'xmin horizon holders').",
    unit="%",
    shows="{value} dead rows",
)

AUTOVACUUM_SERVER_SQL = """
SELECT name AS object, setting AS value
FROM pg_settings
WHERE name IN ('autovacuum', 'track_counts') AND setting <> 'on'
"""

AUTOVACUUM_OFF = Check(
    "autovacuum_off",
    "Autovacuum off for the server",
    sql(AUTOVACUUM_SERVER_SQL),
    EveryRow("critical"),
    "ALTER SYSTEM SET {object} = on; SELECT pg_reload_conf(); (on RDS: the parameter group). "
    "Without it dead rows pile up and transaction-ID wraparound will stop the database.",
    shows="set to {value}",
)


def _table_without_autovacuum(table: TableFigures, context: HealthContext) -> Row | None:
    return None if table.autovacuum_enabled else {"object": table.name, "value": "off"}


AUTOVACUUM_DISABLED = Check(
    "autovacuum_disabled",
    "Autovacuum off for a table",
    each_table(_table_without_autovacuum),
    EveryRow("warning"),
    "ALTER TABLE {object} RESET (autovacuum_enabled);",
    shows="autovacuum_enabled {value}",
)


def _table_not_vacuumed(table: TableFigures, context: HealthContext) -> Row | None:
    """An active table (more changes since its last vacuum than autovacuum's base threshold)
    and the hours since its last vacuum, or since statistics began when it never had one."""
    if (table.changes_since_vacuum or 0) < context.server.get("vacuum_threshold", 50):
        return None
    if table.total_bytes < context.thresholds.minimum_bytes:
        return None  # a small table's vacuum costs nothing and waits for nothing
    last = max((moment for moment in (table.last_vacuum, table.last_autovacuum) if moment), default=None)
    since = last or context.server.get("statistics_since")
    if since is None:
        return None
    return {
        "object": table.name,
        "value": round((context.now - since).total_seconds() / 3600, 3),
        "last_vacuum": last.isoformat(timespec="minutes") if last else "never",
    }


AUTOVACUUM_STALE = Check(
    "autovacuum_stale",
    "Active tables autovacuum has not visited",
    each_table(_table_not_vacuumed),
    AboveThreshold("autovacuum_stale_hours"),
    "Last vacuum: {last_vacuum}. VACUUM (ANALYZE) {object}; then find what holds autovacuum back "
    "(a long transaction, autovacuum_max_workers busy on big tables, or a cost limit too low: "
    "ALTER TABLE {object} SET (autovacuum_vacuum_cost_limit = 2000);).",
    unit="h",
    shows="{value} since a vacuum",
)


def _table_vacuum_due(table: TableFigures, context: HealthContext) -> Row | None:
    if not table.vacuum_due or table.total_bytes < context.thresholds.minimum_bytes:
        return None
    return {"object": table.name, "value": table.dead_rows}


AUTOVACUUM_DUE = Check(
    "autovacuum_due",
    "Tables past their autovacuum threshold",
    each_table(_table_vacuum_due),
    EveryRow("info"),
    "Dead rows past autovacuum_vacuum_threshold + scale factor x rows, by autovacuum's own count; "
    "autovacuum should take it within autovacuum_naptime. If it stays here: VACUUM (ANALYZE) {object};",
    unit="dead row",
)

CHECKS = (TABLE_BLOAT, DEAD_TUPLES, AUTOVACUUM_OFF, AUTOVACUUM_DISABLED, AUTOVACUUM_STALE, AUTOVACUUM_DUE)
