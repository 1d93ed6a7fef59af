"""How each maintenance report reads in a terminal: a few lines, the numbers first."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasks.reports import human_bytes, plural


def counts(values: Mapping[str, int]) -> str:
    """`CRASHED 8 · COMPLETED 6`: largest first, nothing for zero."""
    ranked = sorted(
        ((name, count) for name, count in values.items() if count), key=lambda item: (-item[1], item[0])
    )
    return " · ".join(f"{name} {count:,}" for name, count in ranked) or "none"


def space(sizes: Mapping[str, int] | None) -> str:
    """`about 1.2 MB (log 800.0 kB · flow_run 300.0 kB · ...)`, largest first."""
    if sizes is None:
        return "not estimated (measuring rows takes direct access to a PostgreSQL database)"
    ranked = sorted(((table, size) for table, size in sizes.items() if size), key=lambda item: -item[1])
    parts = " · ".join(f"{table} {human_bytes(size)}" for table, size in ranked)
    return f"about {human_bytes(sum(sizes.values()))} in the rows" + (f" ({parts})" if parts else "")


def reconcile_summary(report: Any) -> list[str]:
    verb = "would fix" if report.dry_run else "fixed"
    lines = [report.summary() + f" (runs found by {report.detection})"]
    for rule in report.rules:
        if rule.found or rule.error:
            line = f"  {rule.rule:20} found {rule.found}, {verb} {rule.fixed}, skipped {rule.skipped}"
            lines.append(line + (f", failed: {rule.error}" if rule.error else f" -> {rule.sets}"))
    return lines


def retention_summary(report: Any) -> list[str]:
    verb = "would delete" if report.dry_run else "deleted"
    lines = [
        f"{verb} {plural(report.flow_runs_deleted, 'flow run')} with the {report.engine} engine in {report.seconds:.1f} s "
        f"({report.stopped_reason}, {report.remaining:,} remaining)",
        f"  by state:      {counts(report.by_state)}",
        f"  by deployment: {counts(report.by_deployment)}",
    ]
    if any(report.rows_deleted.values()):
        lines.append(f"  {verb} rows: {counts(report.rows_deleted)}")
        lines.append(f"  space: {space(report.bytes_deleted)}")
    for title, rows in (("orphans", report.orphan_rows_deleted), ("events", report.event_rows_deleted)):
        if any(rows.values()):
            lines.append(f"  {verb} {title}: {counts(rows)}")
    if report.partitions_dropped:
        names = ", ".join(partition.partition for partition in report.partitions_dropped)
        lines.append(f"  {'would drop' if report.dry_run else 'dropped'} whole partitions: {names}")
    return lines


def health_summary(report: Any) -> list[str]:
    lines = [
        f"verdict {report.verdict.upper()} on the {report.database}: {plural(len(report.flags), 'flag')}"
    ]
    for flag in report.flags[:8]:
        value = "" if flag.value is None else f": {flag.shown}"
        lines.append(f"  {flag.severity:8} {flag.check}: {flag.object}{value}")
    if len(report.flags) > 8:
        lines.append(f"  ... and {len(report.flags) - 8} more in the report")
    return lines
