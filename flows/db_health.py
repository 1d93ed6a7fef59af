"""Flow `db-health-report`: a daily, read-only look at the Prefect database a DBA can trust.

Size and growth per table, real bloat (a statistics-based estimate for every table, confirmed
with pgstattuple for the top tables when `exact`), index health, autovacuum, connections,
locks and blocked queries, deadlocks, transaction-ID wraparound, and what Prefect has piled
up (runs past retention, stuck runs, old events). Each finding past its threshold becomes a
flag with the exact SQL or setting to apply; the worst flag is the verdict.

It never writes to the database: its session is read-only, and a role with `pg_monitor` and
read access to Prefect's tables is all it needs. On SQLite (Prefect's default backend) it
reports the file, its free pages and per-table sizes, and says what does not apply.
"""

from prefect import flow, get_run_logger

from tasks.health.models import HealthReport
from tasks.health.render import health_artifacts
from tasks.health.survey import read_previous_health_report, survey_database
from tasks.health.thresholds import HealthParameters
from tasks.reports import Progress, plural, publish_report, run_name


@flow(
    name="db-health-report",
    flow_run_name=run_name("db-health-report", changes_things=False),
    description="Database size, bloat, vacuum, locks and Prefect backlog, with red flags.",
)
async def db_health_report(
    top_n: int = 20,
    exact: bool = False,
    thresholds: dict[str, float] = {},
    dry_run: bool = False,
) -> HealthReport:
    """Report the health of Prefect's database; publishes the `db-health-report` artifact.

    Args:
        top_n: tables (and indexes) listed in detail; with `exact`, tables confirmed with pgstattuple.
        exact: confirm the most bloated and largest tables with pgstattuple_approx.
        thresholds: overrides by name, e.g. {"table_bloat_percent": 30}; unknown names are rejected.
        dry_run: accepted like every maintenance flow's; the report never writes anyway.
    """
    parameters = HealthParameters.parse(top_n=top_n, exact=exact, thresholds=thresholds, dry_run=dry_run)
    logger = get_run_logger()
    # Created here, so that the progress artifact belongs to the flow run, like the other flows'.
    progress = Progress("Surveying the database: pgstattuple when exact, then every check")
    await progress.update(0)
    previous = await read_previous_health_report()
    report = await survey_database(parameters, previous, progress)
    await publish_report(health_artifacts(report))
    logger.info(
        "Verdict %s: %s (%s) on the %s in %.1f s",
        report.verdict.upper(),
        plural(len(report.flags), "flag"),
        ", ".join(sorted({flag.check for flag in report.flags if flag.severity != "info"}))
        or "none above info",
        report.database,
        report.seconds,
    )
    return report
