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


def scalar_fields(report: Any) -> list[str]:
    """Every top-level number, string or flag of a report, one per line."""
    data = report.model_dump() if hasattr(report, "model_dump") else dict(report)
    return [f"{key}: {value}" for key, value in data.items() if isinstance(value, (int, float, str, bool))]


ALL_STEPS = [
    FlowStep(
        "reconcile-stuck-runs (dry run)",
        "flows.reconcile",
        "reconcile_stuck_runs",
        {"dry_run": True},
        scalar_fields,
    ),
    FlowStep(
        "reconcile-stuck-runs", "flows.reconcile", "reconcile_stuck_runs", {"dry_run": False}, scalar_fields
    ),
    FlowStep("retention (dry run)", "flows.retention", "retention", {"dry_run": True}, scalar_fields),
    FlowStep("retention", "flows.retention", "retention", {"dry_run": False}, scalar_fields),
    FlowStep("db-health-report", "flows.db_health", "db_health_report", {}, scalar_fields),
]
FLOW_STEPS = [step for step in ALL_STEPS if step.available()]
