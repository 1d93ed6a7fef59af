"""How each maintenance report reads in a terminal: a few lines, the numbers first."""

from __future__ import annotations

from typing import Any


def reconcile_summary(report: Any) -> list[str]:
    lines = [report.summary() + f" (detection: {report.detection})"]
    for rule in report.rules:
        if rule.found:
            lines.append(
                f"  {rule.rule:28} found {rule.found}, fixed {rule.fixed}, skipped {rule.skipped} -> {rule.sets}"
            )
    return lines


def retention_summary(report: Any) -> list[str]:
    verb = "would delete" if report.dry_run else "deleted"
    lines = [
        f"engine {report.engine}: {verb} {report.flow_runs_deleted} flow runs in {report.seconds:.1f} s "
        f"({report.stopped_reason}, {report.remaining} remaining)",
        f"  by state: {report.by_state}",
        f"  by deployment: {report.by_deployment}",
    ]
    rows = {table: count for table, count in report.rows_deleted.items() if count}
    if rows:
        lines.append(f"  rows {verb}: {rows}")
    return lines


def health_summary(report: Any) -> list[str]:
    lines = [f"verdict: {report.verdict.upper()} on {report.database} ({len(report.flags)} flags)"]
    for flag in report.flags[:8]:
        lines.append(f"  [{flag.severity}] {flag.check}: {flag.object} = {flag.value}")
    return lines
