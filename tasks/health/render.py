"""The report as the Prefect UI shows it: verdict first, then flags, then a size chart a person
reads at a glance, then the details. Plus one table-artifact row per table, which is also
what the next report compares itself with."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from tasks.health.checks import CHECKS
from tasks.health.framework import InformationOnly, with_unit
from tasks.health.history import TABLE_KEY, table_artifact_description
from tasks.health.models import SEVERITY_ORDER, Flag, HealthReport, TableFigures
from tasks.reports import ReportArtifacts, human_bytes, markdown_table

MARKDOWN_KEY = "db-health-report"
# Words, not colour emoji: the verdict reads the same without an emoji font.
VERDICT_BADGES = {"ok": "OK", "warning": "WARNING", "critical": "CRITICAL"}
SEVERITY_BADGES = {"critical": "**CRITICAL**", "warning": "**warning**", "info": "info"}
CHART_WIDTH = 40
# Heap, indexes and TOAST, stacked in each bar.
CHART_BLOCKS = ("█", "▓", "░")


def health_artifacts(report: HealthReport) -> ReportArtifacts:
    return ReportArtifacts(
        key=MARKDOWN_KEY,
        markdown=render_markdown(report),
        description=markdown_description(report),
        table_key=TABLE_KEY,
        table=table_rows(report),
        table_description=table_artifact_description(report),
    )


def render_markdown(report: HealthReport) -> str:
    sections = [
        _verdict(report),
        _flags(report.flags),
        _size_chart(report),
        _tables(report),
        _indexes(report),
        _information(report.flags),
        *_listed_findings(report),
        _notes(report),
    ]
    return "\n\n".join(section for section in sections if section)


def table_rows(report: HealthReport) -> list[dict[str, Any]]:
    return [
        {
            "table": table.name,
            "total": human_bytes(table.total_bytes),
            "total_bytes": table.total_bytes,
            "heap_bytes": table.heap_bytes,
            "index_bytes": table.index_bytes,
            "toast_bytes": table.toast_bytes,
            "live_rows": table.live_rows,
            "dead_rows": table.dead_rows,
            "dead_percent": table.dead_percent,
            "rows_counted_by": table.rows_method,
            "bloat_percent": table.bloat_percent,
            "bloat_bytes": table.bloat_bytes,
            "bloat_method": table.bloat_method,
            "last_vacuum": _moment(_latest(table.last_vacuum, table.last_autovacuum)),
            "last_analyze": _moment(_latest(table.last_analyze, table.last_autoanalyze)),
            "growth_bytes": table.growth_bytes,
        }
        for table in report.tables
    ]


def markdown_description(report: HealthReport) -> str:
    """The card's one line: `WARNING · 2 warning · 3 info · postgresql database ...`."""
    return f"{report.verdict.upper()} · {_severity_counts(report.flags)} · {report.database}"


def _verdict(report: HealthReport) -> str:
    facts = [report.database]
    if report.server_version:
        facts.append(
            f"{'PostgreSQL' if report.backend == 'postgresql' else 'SQLite'} {report.server_version}"
        )
    if report.database_bytes is not None:
        facts.append(human_bytes(report.database_bytes))
    facts.append(f"{report.generated_at:%Y-%m-%d %H:%M} UTC")
    facts.append(f"{report.seconds:.1f} s")
    growth = ""
    if report.previous_report_at is not None:
        grown = sum(table.growth_bytes or 0 for table in report.tables)
        growth = f"\n\nTables grew {_signed_bytes(grown)} since the previous report ({_moment(report.previous_report_at)})."
    return (
        f"# Database health: {VERDICT_BADGES[report.verdict]}\n\n"
        f"**{_severity_counts(report.flags)}** · " + " · ".join(facts) + growth
    )


def _flags(flags: list[Flag]) -> str:
    """Critical and warning flags; informational ones wait in the details below."""
    raised = [flag for flag in flags if flag.severity != "info"]
    if not raised:
        return "## Flags\n\nNothing above information level: every check is within its thresholds."
    rows = [
        (
            SEVERITY_BADGES[flag.severity],
            flag.check,
            flag.object,
            flag.shown,
            with_unit(flag.threshold, flag.unit),
            flag.advice,
        )
        for flag in sorted(raised, key=lambda flag: SEVERITY_ORDER[flag.severity])
    ]
    return "## Flags\n\n" + markdown_table(
        ("severity", "check", "table, index or session", "measured", "threshold", "advice"), rows
    )


def _information(flags: list[Flag]) -> str:
    rows = [(flag.check, flag.object, flag.shown, flag.advice) for flag in flags if flag.severity == "info"]
    if not rows:
        return ""
    return "## For information\n\n" + markdown_table(
        ("check", "table, index or session", "measured", "advice"), rows
    )


def _size_chart(report: HealthReport) -> str:
    shown = _shown_tables(report)
    if not shown:
        return ""
    largest = max(table.total_bytes for table in shown) or 1
    name_width = max(len(table.name) for table in shown)
    lines = []
    for table in shown:
        parts = (table.heap_bytes, table.index_bytes, table.toast_bytes)
        bar = "".join(
            block * round(CHART_WIDTH * part / largest)
            for block, part in zip(CHART_BLOCKS, parts, strict=True)
        )
        growth = f"  ({_signed_bytes(table.growth_bytes)})" if table.growth_bytes else ""
        lines.append(
            f"{table.name.ljust(name_width)}  {bar.ljust(CHART_WIDTH)}  {human_bytes(table.total_bytes)}{growth}"
        )
    legend = f"{CHART_BLOCKS[0]} table  {CHART_BLOCKS[1]} indexes  {CHART_BLOCKS[2]} TOAST"
    return "## Size by table\n\n```text\n" + "\n".join(lines) + f"\n\n{legend}\n```"


# (header, cell, PostgreSQL only): SQLite has no TOAST, dead rows or vacuum statistics.
Column = tuple[str, Callable[[TableFigures], str], bool]
NAME_COLUMN: Column = (
    "table",
    lambda table: f"**{table.name}**" if table.prefect_table else table.name,
    False,
)
# Two tables by topic, so that each fits the screen: where the space goes, then the rows.
SIZE_COLUMNS: tuple[Column, ...] = (
    NAME_COLUMN,
    ("total", lambda table: human_bytes(table.total_bytes), False),
    ("table data", lambda table: human_bytes(table.heap_bytes), False),
    ("indexes", lambda table: human_bytes(table.index_bytes), False),
    ("TOAST", lambda table: human_bytes(table.toast_bytes), True),
    ("growth", lambda table: _signed_bytes(table.growth_bytes), False),
    ("bloat %", lambda table: _percent(table.bloat_percent), False),
    ("wasted", lambda table: human_bytes(table.bloat_bytes), False),
    ("bloat method", lambda table: _method(table), False),
)
# An estimate is marked `~`; a figure without the mark is exact.
ESTIMATE_MARK = "~"
ROW_COLUMNS: tuple[Column, ...] = (
    NAME_COLUMN,
    ("live rows", lambda table: _rows(table.live_rows, table.live_rows_exact), False),
    ("dead rows", lambda table: _rows(table.dead_rows, table.dead_rows_exact), True),
    (
        "dead %",
        lambda table: _rows(table.dead_percent, table.live_rows_exact and table.dead_rows_exact, "%"),
        True,
    ),
    ("counted by", lambda table: ROWS_METHODS[table.rows_method], False),
    (
        "last vacuum",
        lambda table: (
            _moment(_latest(table.last_vacuum, table.last_autovacuum))
            + (" (due)" if table.vacuum_due else "")
        ),
        True,
    ),
    ("last analyze", lambda table: _moment(_latest(table.last_analyze, table.last_autoanalyze)), True),
)


def _tables(report: HealthReport) -> str:
    shown = _shown_tables(report)
    if not shown:
        return ""

    def table_of(columns: tuple[Column, ...]) -> str:
        kept = [column for column in columns if report.backend == "postgresql" or not column[2]]
        return markdown_table(
            [header for header, _, _ in kept], [[cell(table) for _, cell, _ in kept] for table in shown]
        )

    return (
        f"## Tables (the {report.top_n} largest, and Prefect's fast-growing tables in bold)\n\n"
        + table_of(SIZE_COLUMNS)
        + "\n\nBloat % is wasted space as a share of what the live rows need: 100% means twice the needed size."
        + "\n\n### Rows and vacuum\n\n"
        + table_of(ROW_COLUMNS)
        + "\n\n"
        + _rows_legend(report)
    )


# What each way of counting rows is called in the report, and what it counts.
ROWS_METHODS = {
    "statistics": "statistics",
    "count": "count(*)",
    "pgstattuple_approx": "pgstattuple_approx",
    "pgstattuple": "pgstattuple",
}


def _rows_legend(report: HealthReport) -> str:
    """Which row counts are exact and which are estimates, for the methods this report used."""
    if report.backend != "postgresql":
        return "Live rows are counted exactly (count(*))."
    used = {table.rows_method for table in _shown_tables(report)}
    explained = {
        "statistics": "statistics: PostgreSQL's estimates (`pg_stat_user_tables`), as of its last vacuum or "
        "analyze",
        "count": f"count(*): tables under {report.minimum_megabytes:g} MB (minimum_megabytes), live rows "
        "counted, dead rows from the statistics (pgstattuple is not installed)",
        "pgstattuple": f"pgstattuple: tables under {report.minimum_megabytes:g} MB (minimum_megabytes), "
        "live and dead rows counted",
        "pgstattuple_approx": "pgstattuple_approx (exact=true): dead rows counted, live rows estimated on "
        "the pages it skips",
    }
    return (
        f"A figure marked {ESTIMATE_MARK} is an estimate, any other is exact. Counted by: "
        + "; ".join(explained[method] for method in ROWS_METHODS if method in used)
        + "."
    )


def _indexes(report: HealthReport) -> str:
    shown = report.indexes[: report.top_n]
    if not shown:
        return ""
    rows = [
        (
            index.name,
            index.table,
            index.method,
            human_bytes(index.bytes),
            _count(index.scans),
            _percent(index.bloat_percent),
            human_bytes(index.bloat_bytes),
        )
        for index in shown
    ]
    return f"## Indexes (the {len(shown)} largest)\n\n" + markdown_table(
        ("index", "table", "method", "size", "scans", "bloat %", "wasted"), rows
    )


def _listed_findings(report: HealthReport) -> list[str]:
    sections = []
    for check in CHECKS:
        rows = report.findings.get(check.name)
        if not isinstance(check.severity_rule, InformationOnly) or not rows:
            continue
        headers = list(rows[0])
        sections.append(
            f"## {check.title}\n\n"
            + markdown_table(headers, [[row.get(key) for key in headers] for row in rows])
        )
    return sections


def _notes(report: HealthReport) -> str:
    if not report.notes:
        return ""
    return "## Notes\n\n" + "\n".join(f"- {note}" for note in report.notes)


def _shown_tables(report: HealthReport) -> list[TableFigures]:
    """The `top_n` largest tables, plus Prefect's fast-growing ones wherever they rank."""
    return [
        table
        for position, table in enumerate(report.tables)
        if position < report.top_n or table.prefect_table
    ]


def _severity_counts(flags: list[Flag]) -> str:
    """`1 critical · 2 warning · 3 info`, leaving out none; `no flags` when there are none."""
    counts = {severity: sum(flag.severity == severity for flag in flags) for severity in SEVERITY_ORDER}
    return " · ".join(f"{count} {severity}" for severity, count in counts.items() if count) or "no flags"


def _method(table: TableFigures) -> str:
    if table.bloat_method == "pgstattuple_approx" and table.estimated_bloat_percent is not None:
        return f"pgstattuple_approx (estimate {table.estimated_bloat_percent:g}%)"
    return table.bloat_method or "no statistics yet"


def _latest(*moments: datetime | None) -> datetime | None:
    return max((moment for moment in moments if moment is not None), default=None)


def _moment(moment: datetime | None) -> str:
    return "never" if moment is None else f"{moment:%Y-%m-%d %H:%M}"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _rows(value: float | None, exact: bool, unit: str = "") -> str:
    if value is None:
        return "-"
    return ("" if exact else ESTIMATE_MARK) + with_unit(value, unit)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:g}%"


def _signed_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    return ("+" if value >= 0 else "-") + human_bytes(abs(value))
