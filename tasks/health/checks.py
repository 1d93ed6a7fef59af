"""Every health check as a record, and the one loop that walks them.

A check is a name, a query, a severity rule (which names its thresholds) and advice. The
query returns rows with an `object` (what the flag is about) and a `value`; the rule turns
a row's value into a flag or not; the advice is a template filled from the row, so it can
name the exact table, pid or setting. A new check is a new record plus its query.

Queries come in three kinds: SQL run on the read-only connection (`sql`), a selection over
the per-table or per-index figures the survey already read (`each_table`, `each_index`), and
Prefect-specific ones in `tasks.health.backlog`. Rows of every check are kept in the report
(`findings`); `Listed` checks only inform and never flag.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.database import describe_error
from tasks.health import backlog, concurrency, postgres, sqlite
from tasks.health.models import (
    Backend,
    Flag,
    HealthReport,
    IndexFigures,
    PreviousReport,
    Severity,
    TableFigures,
)
from tasks.health.prefect_indexes import missing_indexes
from tasks.health.statements import rows_of
from tasks.health.thresholds import Thresholds
from tasks.reports import Progress, human_bytes

Row = dict[str, Any]


@dataclass
class Probe:
    """What a query may look at: the connection, the survey so far, the thresholds."""

    backend: Backend
    connection: AsyncConnection
    thresholds: Thresholds
    report: HealthReport
    server: dict[str, Any] = field(default_factory=dict)
    previous: PreviousReport | None = None
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Answers shared by several checks (Prefect's settings), fetched once.
    cache: dict[str, Any] = field(default_factory=dict)


Query = Callable[[Probe], Awaitable[list[Row]]]


def sql(statement: str) -> Query:
    """A query that runs `statement`; thresholds (and `minimum_bytes`) are its bind parameters."""

    async def run(probe: Probe) -> list[Row]:
        parameters = {**probe.thresholds.model_dump(), "minimum_bytes": probe.thresholds.minimum_bytes}
        return await rows_of(probe.connection, statement, parameters)

    return run


def each_table(select: Callable[[TableFigures, Probe], Row | None]) -> Query:
    async def run(probe: Probe) -> list[Row]:
        return [row for table in probe.report.tables if (row := select(table, probe)) is not None]

    return run


def each_index(select: Callable[[IndexFigures, Probe], Row | None]) -> Query:
    async def run(probe: Probe) -> list[Row]:
        return [row for index in probe.report.indexes if (row := select(index, probe)) is not None]

    return run


def each_missing_index(*, if_not_exists: bool) -> Query:
    """The later Prefect indexes (of one kind) the surveyed tables lack."""

    async def run(probe: Probe) -> list[Row]:
        return missing_indexes(probe.report.tables, probe.report.indexes, if_not_exists=if_not_exists)

    return run


# --- Severity rules.


@dataclass(frozen=True)
class Over:
    """Warning above `threshold`, critical above `<threshold>_critical` when that exists;
    `inclusive` makes reaching the level enough."""

    threshold: str
    inclusive: bool = False

    @property
    def threshold_keys(self) -> tuple[str, ...]:
        critical = f"{self.threshold}_critical"
        return (self.threshold, critical) if critical in Thresholds.model_fields else (self.threshold,)

    def judge(self, value: Any, thresholds: Thresholds) -> tuple[Severity, float] | None:
        if not isinstance(value, int | float):
            return None
        levels: list[tuple[Severity, str]] = [("critical", key) for key in self.threshold_keys[1:]]
        levels.append(("warning", self.threshold))
        for severity, key in levels:
            level = getattr(thresholds, key)
            if value > level or (self.inclusive and value >= level):
                return severity, level
        return None


@dataclass(frozen=True)
class Whenever:
    """Every row the query returns is a flag of this severity."""

    severity: Severity
    threshold_keys: tuple[str, ...] = ()

    def judge(self, value: Any, thresholds: Thresholds) -> tuple[Severity, None] | None:
        return self.severity, None


@dataclass(frozen=True)
class Positive:
    """A flag of this severity when the value is a positive number."""

    severity: Severity
    threshold_keys: tuple[str, ...] = ()

    def judge(self, value: Any, thresholds: Thresholds) -> tuple[Severity, float] | None:
        return (self.severity, 0.0) if isinstance(value, int | float) and value > 0 else None


@dataclass(frozen=True)
class Listed:
    """Information for the report; never a flag."""

    threshold_keys: tuple[str, ...] = ()

    def judge(self, value: Any, thresholds: Thresholds) -> None:
        return None


Rule = Over | Whenever | Positive | Listed


@dataclass(frozen=True)
class Check:
    name: str
    title: str
    query: Query
    rule: Rule
    advice: str | Mapping[Backend, str] = ""
    unit: str = ""
    backends: tuple[Backend, ...] = ("postgresql",)

    def advice_for(self, backend: Backend, row: Row) -> str:
        template = self.advice if isinstance(self.advice, str) else self.advice.get(backend, "")
        return template.format_map(_Blanks(row))


class _Blanks(dict):
    """Advice templates name row fields; a field a row lacks reads as '-'."""

    def __missing__(self, key: str) -> str:
        return "-"


# --- Selections over the survey's figures.


def _bloated_table(table: TableFigures, probe: Probe) -> Row | None:
    if table.bloat_percent is None or table.total_bytes < probe.thresholds.minimum_bytes:
        return None
    return {
        "object": table.name,
        "value": table.bloat_percent,
        "wasted": human_bytes(table.bloat_bytes),
        "method": table.bloat_method,
    }


def _table_with_dead_rows(table: TableFigures, probe: Probe) -> Row | None:
    if table.dead_percent is None or table.total_bytes < probe.thresholds.minimum_bytes:
        return None
    return {"object": table.name, "value": table.dead_percent, "dead_rows": table.dead_rows}


def _table_without_autovacuum(table: TableFigures, probe: Probe) -> Row | None:
    return None if table.autovacuum_enabled else {"object": table.name, "value": "off"}


def _table_vacuum_due(table: TableFigures, probe: Probe) -> Row | None:
    return {"object": table.name, "value": table.dead_rows} if table.vacuum_due else None


def _table_not_vacuumed(table: TableFigures, probe: Probe) -> Row | None:
    """An active table (more changes since its last vacuum than autovacuum's base threshold)
    and the hours since its last vacuum, or since statistics began when it never had one."""
    if (table.changes_since_vacuum or 0) < probe.server.get("vacuum_threshold", 50):
        return None
    last = max((moment for moment in (table.last_vacuum, table.last_autovacuum) if moment), default=None)
    since = last or probe.server.get("statistics_since")
    if since is None:
        return None
    return {
        "object": table.name,
        "value": round((probe.now - since).total_seconds() / 3600, 3),
        "last_vacuum": last.isoformat(timespec="minutes") if last else "never",
    }


def _bloated_index(index: IndexFigures, probe: Probe) -> Row | None:
    if index.bloat_percent is None or index.bytes < probe.thresholds.minimum_bytes:
        return None
    return {"object": index.name, "value": index.bloat_percent, "wasted": human_bytes(index.bloat_bytes)}


def _unused_index(index: IndexFigures, probe: Probe) -> Row | None:
    if index.scans != 0 or index.unique or index.bytes < probe.thresholds.minimum_bytes:
        return None
    if _is_prefect_index(index):
        # Prefect's own queries need it the day its feature is used; dropping it is not advice.
        return None
    since = probe.server.get("statistics_since")
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


def _invalid_index(index: IndexFigures, probe: Probe) -> Row | None:
    return None if index.valid else {"object": index.name, "value": index.bytes, "table": index.table}


async def _new_deadlocks(probe: Probe) -> list[Row]:
    """Deadlocks since the previous report (all of them when there is none to compare with)."""
    row = (await rows_of(probe.connection, postgres.DEADLOCKS_SQL))[0]
    total = row["deadlocks"]
    previous = probe.previous.deadlocks if probe.previous else None
    if previous is not None and previous <= total:
        value, window = (
            total - previous,
            f"since the previous report ({probe.previous.created:%Y-%m-%d %H:%M})",
        )
    else:
        value, window = total, f"since statistics began ({row['since']:%Y-%m-%d %H:%M})"
    return [{"object": row["object"], "value": value, "total": total, "window": window}]


_VACUUM_ADVICE = (
    "VACUUM (ANALYZE) {object}; makes the space reusable. To give it back to the disk: pg_repack, or "
    "VACUUM (FULL, ANALYZE) {object}; in a maintenance window (it locks the table; never in business hours)."
)

CHECKS: tuple[Check, ...] = (
    Check(
        "table_bloat",
        "Table bloat",
        each_table(_bloated_table),
        Over("table_bloat_percent"),
        {
            "postgresql": "{wasted} wasted ({method}). " + _VACUUM_ADVICE,
            "sqlite": "{wasted} unused inside its pages (dbstat). VACUUM; rewrites the file compactly "
            "(stop the Prefect server first; it needs free disk about the size of the file).",
        },
        unit="%",
        backends=("postgresql", "sqlite"),
    ),
    Check(
        "dead_tuples",
        "Dead rows",
        each_table(_table_with_dead_rows),
        Over("dead_tuple_percent"),
        "{dead_rows} dead rows. VACUUM (ANALYZE) {object}; and see what keeps autovacuum behind "
        "(long transactions hold the xmin horizon: see 'xmin horizon holders').",
        unit="%",
    ),
    Check(
        "autovacuum_off",
        "Autovacuum off for the server",
        sql(postgres.AUTOVACUUM_SERVER_SQL),
        Whenever("critical"),
        "ALTER SYSTEM SET {object} = on; SELECT pg_reload_conf(); (on RDS: the parameter group). "
        "Without it dead rows pile up and transaction-ID wraparound will stop the database.",
    ),
    Check(
        "autovacuum_disabled",
        "Autovacuum off for a table",
        each_table(_table_without_autovacuum),
        Whenever("warning"),
        "ALTER TABLE {object} RESET (autovacuum_enabled);",
    ),
    Check(
        "autovacuum_stale",
        "Active tables autovacuum has not visited",
        each_table(_table_not_vacuumed),
        Over("autovacuum_stale_hours"),
        "Last vacuum: {last_vacuum}. VACUUM (ANALYZE) {object}; then find what holds autovacuum back "
        "(a long transaction, autovacuum_max_workers busy on big tables, or a cost limit too low: "
        "ALTER TABLE {object} SET (autovacuum_vacuum_cost_limit = 2000);).",
        unit="h",
    ),
    Check(
        "autovacuum_due",
        "Tables past their autovacuum threshold",
        each_table(_table_vacuum_due),
        Whenever("info"),
        "{value} dead rows, past autovacuum_vacuum_threshold + scale factor x rows; autovacuum should "
        "take it within autovacuum_naptime. If it stays here: VACUUM (ANALYZE) {object};",
        unit="rows",
    ),
    Check(
        "index_bloat",
        "B-tree index bloat",
        each_index(_bloated_index),
        Over("index_bloat_percent"),
        "{wasted} wasted (estimate). REINDEX INDEX CONCURRENTLY {object};",
        unit="%",
    ),
    Check(
        "unused_indexes",
        "Unused indexes",
        each_index(_unused_index),
        Whenever("info"),
        "Never scanned since {since}, yet every write to {table} maintains it. If that period is "
        "representative: DROP INDEX CONCURRENTLY {object};",
        unit="bytes",
    ),
    Check(
        "duplicate_indexes",
        "Duplicate indexes",
        sql(postgres.DUPLICATE_INDEXES_SQL),
        Whenever("warning"),
        "Identical to {twin}: DROP INDEX CONCURRENTLY {object};",
        unit="bytes",
    ),
    Check(
        "invalid_indexes",
        "Invalid indexes",
        each_index(_invalid_index),
        Whenever("warning"),
        "Left behind by a failed CREATE INDEX CONCURRENTLY: maintained on every write to {table}, never "
        "used. REINDEX INDEX CONCURRENTLY {object}; (or DROP INDEX CONCURRENTLY {object};)",
        unit="bytes",
    ),
    Check(
        "foreign_keys_without_index",
        "Foreign keys without an index",
        sql(postgres.FOREIGN_KEYS_WITHOUT_INDEX_SQL),
        Whenever("info"),
        "Deleting from {referenced_table} scans {table_name} for each row: "
        "CREATE INDEX CONCURRENTLY {index_name} ON {table_name} ({columns});",
        unit="bytes",
    ),
    Check(
        "missing_prefect_indexes",
        "Indexes a later Prefect adds",
        each_missing_index(if_not_exists=True),
        Whenever("warning"),
        "Prefect {added_in} adds this index to {value} (migration {revision}); without it its queries and "
        "retention's deletes scan the table. Create it now, exactly as that migration does (the upgrade then "
        "skips it): {statement}",
    ),
    Check(
        "indexes_awaiting_upgrade",
        "Indexes the next Prefect upgrade builds",
        each_missing_index(if_not_exists=False),
        Whenever("info"),
        "Prefect {added_in} builds this index on {value} (migration {revision}) with a plain CREATE INDEX: do "
        "not create it by hand, the upgrade would fail on it. Upgrading the server builds it (it locks "
        "{value} against writes while it does).",
    ),
    Check(
        "connections",
        "Connections",
        sql(postgres.CONNECTIONS_SQL),
        Over("connections_percent", inclusive=True),
        "{connections} of {max_connections} connections in use (see 'Connections by client'). Each Prefect "
        "server process holds up to PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE + "
        "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW connections: lower them, or put PgBouncer in front.",
        unit="%",
    ),
    Check(
        "connections_by_client", "Connections by client", sql(postgres.CONNECTIONS_BY_CLIENT_SQL), Listed()
    ),
    Check(
        "idle_in_transaction",
        "Sessions idle in a transaction",
        sql(postgres.IDLE_IN_TRANSACTION_SQL),
        Over("idle_in_transaction_seconds"),
        "pid {pid} ({user_name}, {application}) holds its locks and the xmin horizon, idle since: {last_query}. "
        "End it: SELECT pg_terminate_backend({pid}); prevent it: "
        "ALTER ROLE {user_name} SET idle_in_transaction_session_timeout = '5min';",
        unit="s",
    ),
    Check(
        "blocked_queries",
        "Blocked queries",
        sql(postgres.BLOCKED_QUERIES_SQL),
        Over("blocked_query_seconds"),
        "pid {pid} ({query}) waits for pid {blocking_pids}: {blocking_query}. If the blocker is stuck: "
        "SELECT pg_terminate_backend({first_blocking_pid});",
        unit="s",
    ),
    Check(
        "long_transactions",
        "Long-running transactions",
        sql(postgres.LONG_TRANSACTIONS_SQL),
        Over("long_transaction_seconds"),
        "pid {pid} ({user_name}, {application}, {state}): {query}. It holds back vacuum everywhere; "
        "if it should not run this long: SELECT pg_cancel_backend({pid});",
        unit="s",
    ),
    Check("locks", "Locks by mode", sql(postgres.LOCKS_SQL), Listed()),
    Check(
        "deadlocks",
        "Deadlocks",
        _new_deadlocks,
        Over("deadlocks"),
        "{value} deadlocks {window} ({total} in all). SET log_lock_waits = on and read 'deadlock detected' "
        "in the server log. Prefect workers polling one work queue deadlock on UPDATE deployment SET "
        "last_polled: run one worker per queue with a queue concurrency limit.",
        unit="deadlocks",
    ),
    Check("xmin_horizon", "xmin horizon holders", sql(postgres.XMIN_HOLDERS_SQL), Listed()),
    Check(
        "inactive_replication_slots",
        "Inactive replication slots",
        sql(postgres.INACTIVE_SLOTS_SQL),
        Whenever("warning"),
        "It holds the xmin horizon ({value} transactions behind) and WAL. If nothing consumes it any more: "
        "SELECT pg_drop_replication_slot('{slot_name}');",
        unit="transactions",
    ),
    Check(
        "prepared_transactions",
        "Old prepared transactions",
        sql(postgres.PREPARED_TRANSACTIONS_SQL),
        Over("long_transaction_seconds"),
        "It holds locks and the xmin horizon: COMMIT PREPARED '{gid}'; or ROLLBACK PREPARED '{gid}';",
        unit="s",
    ),
    Check(
        "wraparound",
        "Transaction-ID wraparound",
        sql(postgres.WRAPAROUND_SQL),
        Over("wraparound_percent", inclusive=True),
        "Age {age} (100% = autovacuum_freeze_max_age, when anti-wraparound vacuums start). "
        "VACUUM (FREEZE, VERBOSE) the oldest tables ({oldest_tables}) and end whatever holds the xmin horizon.",
        unit="%",
    ),
    Check(
        "sequences",
        "Sequences near their maximum",
        sql(postgres.SEQUENCES_SQL),
        Over("sequence_percent", inclusive=True),
        "{last_value} of {maximum}. Widen the column and the sequence to bigint: "
        "ALTER SEQUENCE {object} AS bigint;",
        unit="%",
    ),
    Check(
        "sqlite_free_pages",
        "Free pages in the SQLite file",
        sqlite.free_pages,
        Over("sqlite_free_percent"),
        "{free} of the file is free pages. VACUUM; rewrites it compactly (stop the Prefect server first; "
        "it needs free disk about the size of the file), or PRAGMA auto_vacuum = INCREMENTAL; "
        "then VACUUM; once, after which PRAGMA incremental_vacuum; frees pages without a rewrite.",
        unit="%",
        backends=("sqlite",),
    ),
    Check(
        "expired_runs",
        "Runs past the default retention",
        backlog.expired_runs,
        Positive("info"),
        "{value} finished top-level runs (with their subflows) are older than the default "
        "retention ({retention}). "
        "Run the retention deployment (a dry run first: dry_run=true); {server_vacuum}",
        unit="runs",
        backends=("postgresql", "sqlite"),
    ),
    Check(
        "stuck_runs",
        "Stuck runs",
        backlog.stuck_runs,
        Positive("warning"),
        "{value} runs match the reconcile rule '{object}'. Run the reconcile-stuck-runs deployment "
        "(a dry run first: dry_run=true).",
        unit="runs",
        backends=("postgresql", "sqlite"),
    ),
    Check(
        "concurrency_slots",
        "Concurrency slots held by no live run, or missing",
        concurrency.concurrency_limits,
        Positive("warning", threshold_keys=("leaked_slot_minutes",)),
        "{advice}",
        unit="slots",
    ),
    Check(
        "events_past_retention",
        "Events older than their retention",
        backlog.events_past_retention,
        Positive("warning"),
        "The oldest event ({oldest}) is {value} days past the event retention ({retention}): Prefect's "
        "event trimming ({trimmed_by}) is not running. {trimming_advice}, or run the retention flow with "
        "events_older_than_days.",
        unit="days",
        backends=("postgresql", "sqlite"),
    ),
    Check(
        "events_per_day",
        "Events per day (last 7 days)",
        backlog.events_per_day,
        Listed(),
        backends=("postgresql", "sqlite"),
    ),
    Check(
        "prefect_vacuum_settings",
        "Prefect's own cleanup settings",
        backlog.vacuum_settings,
        Listed(),
        backends=("postgresql", "sqlite"),
    ),
)

CHECKS_BY_NAME = {check.name: check for check in CHECKS}


async def run_checks(
    probe: Probe, checks: tuple[Check, ...] = CHECKS, progress: Progress | None = None
) -> None:
    """Run every check of the probe's backend; a check that fails is noted and the rest go on."""
    applicable = [check for check in checks if probe.backend in check.backends]
    for position, check in enumerate(applicable, start=1):
        started = time.perf_counter()
        try:
            rows = await check.query(probe)
        except Exception as error:
            probe.report.notes.append(f"The check '{check.name}' could not run: {describe_error(error)}")
            continue
        finally:
            probe.report.check_seconds[check.name] = round(time.perf_counter() - started, 3)
        probe.report.findings[check.name] = [
            {key: _plain(value) for key, value in row.items()} for row in rows
        ]
        for row in rows:
            judged = check.rule.judge(row.get("value"), probe.thresholds)
            if judged is None:
                continue
            severity, threshold = judged
            probe.report.flags.append(
                Flag(
                    severity=severity,
                    check=check.name,
                    object=str(row["object"]),
                    value=_plain(row.get("value")),
                    threshold=threshold,
                    unit=check.unit,
                    advice=check.advice_for(probe.backend, row),
                )
            )
        if progress is not None:
            await progress.update(100.0 * position / len(applicable))


def _plain(value: Any) -> Any:
    """A JSON-friendly value for the report."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value
