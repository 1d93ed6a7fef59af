"""The demo's flow steps: which flow runs with which parameters, and how its report reads
in a terminal (the command line's summaries). A step whose flow module is not installed is
left out."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cli.summaries import health_summary, reconcile_summary, retention_summary


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
