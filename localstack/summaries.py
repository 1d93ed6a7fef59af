"""The demo's flow steps: which flow runs with which parameters, and how its report reads
in a terminal. A step whose flow module is not installed is left out."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FlowStep:
    title: str
    module: str
    function: str
    parameters: dict[str, Any] = field(default_factory=dict)
    summarize: Callable[[Any], Iterable[str]] = lambda report: [repr(report)]

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def run(self) -> Awaitable[Any]:
        flow = getattr(importlib.import_module(self.module), self.function)
        return flow(**self.parameters)


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


ALL_STEPS = [
    FlowStep(
        "reconcile-stuck-runs (dry run)",
        "flows.reconcile",
        "reconcile_stuck_runs",
        {"dry_run": True, "late_after_hours": 24},
        reconcile_summary,
    ),
    FlowStep(
        "reconcile-stuck-runs",
        "flows.reconcile",
        "reconcile_stuck_runs",
        {"dry_run": False, "late_after_hours": 24},
        reconcile_summary,
    ),
    FlowStep("retention (dry run)", "flows.retention", "retention", {"dry_run": True}, retention_summary),
    FlowStep("retention", "flows.retention", "retention", {"dry_run": False}, retention_summary),
    FlowStep("db-health-report", "flows.db_health", "db_health_report", {}, health_summary),
]
FLOW_STEPS = [step for step in ALL_STEPS if step.available()]
