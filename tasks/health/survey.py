"""The report's Prefect tasks: read the previous report, survey the database and run every
check on one read-only session, publish the artifacts.

The session is the project's read-only one (`default_transaction_read_only`,
`statement_timeout`, `lock_timeout`) in autocommit mode: each statement is its own short
transaction, so the report never holds a snapshot (and the xmin horizon) for its whole
duration, and a statement that fails or times out costs only its own check.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.database import DatabaseUnavailable, connect, describe_error, dialect_of
from tasks.health import postgres, sqlite
from tasks.health.checks import CHECKS
from tasks.health.framework import HealthContext, run_checks
from tasks.health.history import apply_growth, read_previous_report
from tasks.health.models import SEVERITY_ORDER, Flag, HealthReport, PreviousReport, verdict_of
from tasks.health.thresholds import HealthParameters
from tasks.prefect_api import PrefectApiError
from tasks.reports import Progress, plural
from tasks.settings import get_settings

PGSTATTUPLE_MISSING = (
    "exact=true asked for pgstattuple, which is not installed in this database; the bloat figures are "
    "estimates. To install it (as the database owner or a superuser; allowed on RDS): "
    "CREATE EXTENSION pgstattuple; members of pg_monitor may then run it."
)


@task(name="read-previous-report", cache_policy=NO_CACHE)
async def read_previous_health_report() -> PreviousReport | None:
    """The previous report's figures; without them the report still runs, without growth."""
    try:
        return await read_previous_report()
    except (PrefectApiError, ValueError) as error:
        get_run_logger().warning("The previous report could not be read (%s): no growth this time", error)
        return None


@task(name="survey-database", cache_policy=NO_CACHE)
async def survey_database(
    parameters: HealthParameters, previous: PreviousReport | None, progress: Progress
) -> HealthReport:
    """Everything the report says about the database, read-only; never raises for a check.
    `progress` is the flow run's progress artifact: pgstattuple (when exact), then the checks."""
    logger = get_run_logger()
    started = time.perf_counter()
    settings = get_settings()
    report = HealthReport(
        backend=None,
        database=settings.database_description,
        generated_at=datetime.now(UTC),
        exact=parameters.exact,
        top_n=parameters.top_n,
        minimum_megabytes=parameters.thresholds.minimum_megabytes,
    )
    if settings.database_url is None:
        report.flags.append(_unreachable(report, "no database URL is configured (MAINTENANCE_DATABASE_URL)"))
    else:
        report.backend = dialect_of(settings.database_url)
        try:
            async with connect(read_only=True) as session:
                connection = await session.execution_options(isolation_level="AUTOCOMMIT")
                context = HealthContext(
                    report.backend, connection, parameters.thresholds, report, previous=previous
                )
                checked_from = 40.0 if parameters.exact else 0.0
                if report.backend == "postgresql":
                    await _survey_postgresql(context, parameters, progress.span(0, checked_from))
                else:
                    await _survey_sqlite(context)
                logger.info(
                    "Surveyed %s and %s of the %s",
                    plural(len(report.tables), "table"),
                    plural(len(report.indexes), "index", "indexes"),
                    report.database,
                )
                await run_checks(context, CHECKS, progress=progress.span(checked_from, 100))
        except DatabaseUnavailable as error:
            report.flags.append(_unreachable(report, str(error)))
    apply_growth(report, previous)
    report.flags.sort(key=lambda flag: SEVERITY_ORDER[flag.severity])
    report.verdict = verdict_of(report.flags)
    report.seconds = round(time.perf_counter() - started, 2)
    return report


async def _survey_postgresql(
    context: HealthContext, parameters: HealthParameters, progress: Progress
) -> None:
    connection, report = context.connection, context.report
    context.server = await postgres.read_server(connection)
    report.server_version = context.server["server_version"]
    report.database_bytes = context.server["database_bytes"]
    report.deadlocks = context.server["deadlocks"]
    report.tables, storage = await postgres.read_tables(connection, context.server)
    report.indexes = await postgres.read_indexes(connection, context.server)
    await _count_small_tables(context, storage)
    if parameters.exact:
        await _confirm_with_pgstattuple(context, storage, parameters.top_n, progress)
    unmeasured = [
        table.name for table in report.tables if table.bloat_method is None and table.heap_bytes > 0
    ]
    if unmeasured:
        report.notes.append(
            f"No bloat figure for {plural(len(unmeasured), 'table')} without planner statistics (never "
            f"analyzed, or their columns are not readable by this role): {', '.join(unmeasured[:10])}."
        )


async def _count_small_tables(context: HealthContext, storage: dict[str, postgres.TableStorage]) -> None:
    """Exact rows for every table below minimum_megabytes: reading one costs less than a
    statistics estimate misleads (a table of 24 rows shown as 1 live and 25 dead)."""
    uncounted = []
    for table in context.report.tables:
        if table.total_bytes >= context.thresholds.minimum_bytes:
            continue
        try:
            await postgres.count_small_table(context.connection, table, storage[table.name], context.server)
        except Exception as error:
            uncounted.append(f"{table.name} ({describe_error(error)})")
    if uncounted:
        context.report.notes.append(
            f"{plural(len(uncounted), 'small table')} not counted, their rows are estimates: "
            + "; ".join(uncounted[:5])
            + ("; ..." if len(uncounted) > 5 else "")
        )


async def _confirm_with_pgstattuple(
    context: HealthContext, storage: dict[str, postgres.TableStorage], top_n: int, progress: Progress
) -> None:
    report = context.report
    if context.server["pgstattuple_schema"] is None:
        report.notes.append(PGSTATTUPLE_MISSING)
        return
    # The most suspicious first (most estimated waste), then the largest; never a table below
    # minimum_megabytes, whose waste nothing is flagged for.
    candidates = sorted(
        (
            table
            for table in report.tables
            if table.heap_bytes > 0 and table.total_bytes >= context.thresholds.minimum_bytes
        ),
        key=lambda table: (table.bloat_bytes or 0, table.total_bytes),
        reverse=True,
    )[:top_n]
    for position, table in enumerate(candidates, start=1):
        try:
            await postgres.confirm_with_pgstattuple(
                context.connection, table, storage[table.name], context.server
            )
        except Exception as error:
            report.notes.append(f"pgstattuple_approx on {table.name} did not finish: {describe_error(error)}")
        await progress.update(100.0 * position / len(candidates))


async def _survey_sqlite(context: HealthContext) -> None:
    report = context.report
    context.server = await sqlite.read_server(context.connection)
    report.server_version = context.server["server_version"]
    report.database_bytes = context.server["database_bytes"]
    report.tables, report.indexes = await sqlite.read_tables_and_indexes(
        context.connection, context.server, report.notes
    )
    report.notes.append(sqlite.NOT_APPLICABLE)


def _unreachable(report: HealthReport, reason: str) -> Flag:
    return Flag(
        severity="warning",
        check="database_reachable",
        object=report.database,
        advice=f"The report could not read the database: {reason}. Set MAINTENANCE_DATABASE_URL for a "
        "read-only role (see the README: pg_monitor + pg_read_all_data).",
    )
