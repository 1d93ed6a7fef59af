"""What the reports, summaries and log lines say about one of a thing: the singular."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cli.summaries import health_summary, retention_summary
from tasks.health.models import Flag, HealthReport
from tasks.retention.report import RetentionReport

pytestmark = pytest.mark.no_stack


def retention_report(count: int) -> RetentionReport:
    return RetentionReport(
        engine="sql",
        dry_run=False,
        database="postgresql database 'prefect'",
        days_per_state={"COMPLETED": count, "FAILED": 30},
        flow_runs_deleted=count,
        rows_deleted={"flow_run": count},
        bytes_deleted={"flow_run": 1000 * count},
        orphan_rows_deleted={},
        event_rows_deleted={},
        by_state={"COMPLETED": count},
        by_deployment={},
        by_flow={},
        sample=[],
        left={},
        remaining=count,
        stopped_reason="max_minutes",
        batches=count,
        seconds=1.0,
        runs_per_second=1.0,
        max_runs_per_second=10,
        slowdowns=count,
        vacuumed_tables=[],
        notes=[],
    )


def test_the_retention_report_of_one_run_speaks_in_the_singular():
    one = retention_report(1).to_markdown()
    assert "# Retention: deleted 1 flow run\n" in one
    assert "- ages: COMPLETED 1 day, FAILED 30 days" in one
    assert "- 1 batch in 1.0 s" in one and "slowed down 1 time)" in one
    assert "1 expired top-level run remains" in one
    two = retention_report(2).to_markdown()
    assert "deleted 2 flow runs" in two and "COMPLETED 2 days" in two and "slowed down 2 times)" in two
    assert "2 expired top-level runs remain" in two
    summary = retention_summary(retention_report(1))
    assert summary[0].startswith("deleted 1 flow run with the sql engine")
    assert "  deleted rows: flow_run 1" in summary


def test_the_health_summary_counts_its_flags_and_shows_each_value_with_its_unit():
    flag = Flag(
        severity="info",
        check="autovacuum_due",
        object="log",
        value=117,
        unit="dead row",
        shown="117 dead rows",
        advice="VACUUM (ANALYZE) log;",
    )
    report = HealthReport(
        backend="postgresql",
        database="postgresql database 'prefect'",
        generated_at=datetime.now(UTC),
        flags=[flag],
    )
    lines = health_summary(report)
    assert lines[0] == "verdict OK on the postgresql database 'prefect': 1 flag"
    assert lines[1].strip() == "info     autovacuum_due: log: 117 dead rows"
