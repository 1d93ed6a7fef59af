"""The db-health-report on older Prefect servers: their settings and their schema as they are.

A 3.1 server's settings have no db_vacuum (its event persister trims events) and its schema
lacks every index Prefect added since; a 3.4 server lacks the six a later migration builds
with CREATE INDEX CONCURRENTLY IF NOT EXISTS. The report must read each server as it is,
and the statements it advises must build exactly the indexes the newest Prefect has.
"""

from __future__ import annotations

from conftest import serving
from history import database_of, flags_of

from flows.db_health import db_health_report
from tasks.health.checks.prefect_indexes import LATER_PREFECT_INDEXES
from tasks.health.cleanup_settings import NOT_KNOWN
from tasks.health.models import HealthReport

INDEX_DEFINITIONS_SQL = (
    "SELECT indexname || ' ' || indexdef FROM pg_indexes WHERE indexname IN ({names}) ORDER BY indexname"
)


def failed_checks(report: HealthReport) -> list[str]:
    return [note for note in report.notes if "could not run" in note]


def settings_listed(report: HealthReport) -> dict[str, str]:
    return {row["object"]: row["value"] for row in report.findings["prefect_vacuum_settings"]}


async def test_a_3_1_server_is_judged_by_its_event_persister_and_lacks_the_later_indexes(stack, fresh_server):
    server = fresh_server(version="3.1.15")
    stack.postgres.psql(
        "INSERT INTO events (id, occurred, event, resource_id, resource, payload, received, recorded) "
        "VALUES (gen_random_uuid(), now() - interval '30 days', 'prefect.flow-run.Completed', "
        "'prefect.flow-run.old', '{}', '{}', now(), now())",
        database=database_of(server),
    )
    with serving(server):
        report = await db_health_report()

    assert failed_checks(report) == []
    events = report.findings["events_past_retention"][0]
    assert (events["trimmed_by"], events["retention"]) == ("event_persister", "7 days")
    # 30 days old, 7 days of retention, trimmed every 15 minutes: 23 days overdue.
    assert events["value"] == 23.0
    advice = flags_of(report, "events_past_retention")["events"].advice
    assert "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED=true" in advice
    assert "DB_VACUUM" not in advice

    settings = settings_listed(report)
    assert settings["PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED"] == NOT_KNOWN
    assert settings["PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD"] == NOT_KNOWN
    assert settings["PREFECT_SERVER_EVENTS_RETENTION_PERIOD"] == "7 days"
    assert settings["PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED"] == "True"
    assert "no db_vacuum service" in report.findings["expired_runs"][0]["server_vacuum"]

    # The events indexes 3.3.4 rebuilds with a plain CREATE INDEX: the advice is the upgrade.
    awaiting = flags_of(report, "indexes_awaiting_upgrade")
    assert set(awaiting) == {
        "ix_events__event_occurred",
        "ix_events__related_gin",
        "ix_events__related_resource_ids_gin",
    }
    assert all(flag.severity == "info" and "CONCURRENTLY" not in flag.advice for flag in awaiting.values())
    assert len(flags_of(report, "missing_prefect_indexes")) == 6


async def test_the_current_server_is_judged_by_db_vacuum_and_misses_no_index():
    report = await db_health_report()

    assert failed_checks(report) == []
    events = report.findings["events_past_retention"][0]
    assert (events["trimmed_by"], events["retention"]) == ("db_vacuum", "7 days")
    assert settings_listed(report)["PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED"] == "events"
    assert report.findings["missing_prefect_indexes"] == []
    assert report.findings["indexes_awaiting_upgrade"] == []


async def test_on_a_3_4_server_each_missing_index_is_advised_with_the_statement_of_its_migration(
    stack, fresh_server
):
    server = fresh_server(version="3.4.25")
    with serving(server):
        report = await db_health_report()

    assert failed_checks(report) == []
    creatable = [record for record in LATER_PREFECT_INDEXES if record.if_not_exists]
    flags = flags_of(report, "missing_prefect_indexes")
    assert set(flags) == {record.name for record in creatable}
    for record in creatable:
        assert flags[record.name].severity == "warning"
        assert flags[record.name].advice.endswith(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {record.name} ON {record.table} {record.definition};"
        )
    assert report.findings["indexes_awaiting_upgrade"] == []

    for record in creatable:
        stack.postgres.psql(record.statement, database=database_of(server))
    names = ", ".join(f"'{record.name}'" for record in creatable)
    # The same name and the same definition as the newest Prefect's own migrations build.
    assert stack.postgres.psql(INDEX_DEFINITIONS_SQL.format(names=names), database=database_of(server)) == (
        stack.postgres.psql(INDEX_DEFINITIONS_SQL.format(names=names), database=database_of(stack.server))
    )

    with serving(server):
        report = await db_health_report()
    assert report.findings["missing_prefect_indexes"] == []
    assert "missing_prefect_indexes" not in {flag.check for flag in report.flags}
