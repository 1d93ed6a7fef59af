"""The `db-health-report` parameters and the thresholds its checks compare against.

Defaults follow Prefect's database-maintenance guide ("red flags requiring immediate
action") and check_postgres / pghero practice. Every threshold can be overridden by name
through the flow's `thresholds` parameter; a name that is not listed here is rejected, so a
typo never silently leaves a default in place. A `<name>_critical` key is the level at
which the same check turns from warning to critical.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.parameters import FlowParameters


class Thresholds(BaseModel):
    model_config = ConfigDict(extra="forbid")

    table_bloat_percent: float = Field(
        50, ge=0, description="Table bloat (wasted space as % of what the live rows need): warning above."
    )
    table_bloat_percent_critical: float = Field(100, ge=0, description="Table bloat: critical above.")
    index_bloat_percent: float = Field(50, ge=0, description="B-tree index bloat: warning above.")
    index_bloat_percent_critical: float = Field(100, ge=0, description="B-tree index bloat: critical above.")
    dead_tuple_percent: float = Field(
        20, ge=0, le=100, description="Dead rows as % of all rows of a table: warning above."
    )
    minimum_megabytes: float = Field(
        10,
        ge=0,
        description="Tables and indexes smaller than this are listed but never flagged for bloat, "
        "dead rows, unused indexes or foreign keys without an index; their rows are counted exactly "
        "(pgstattuple, else count(*)), since reading them costs next to nothing.",
    )
    connections_percent: float = Field(
        80, ge=0, description="Connections as % of max_connections: warning at."
    )
    connections_percent_critical: float = Field(95, ge=0, description="Connections: critical at.")
    autovacuum_stale_hours: float = Field(
        24, ge=0, description="An active table not vacuumed for this long is flagged."
    )
    long_transaction_seconds: float = Field(
        600, ge=0, description="A transaction (or prepared transaction) open this long: warning above."
    )
    idle_in_transaction_seconds: float = Field(
        300, ge=0, description="A session idle inside a transaction this long: warning above."
    )
    blocked_query_seconds: float = Field(
        60, ge=0, description="A query waiting for a lock this long: warning above."
    )
    wraparound_percent: float = Field(
        50, ge=0, description="Transaction-ID age as % of autovacuum_freeze_max_age: warning at."
    )
    wraparound_percent_critical: float = Field(80, ge=0, description="Transaction-ID age: critical at.")
    sequence_percent: float = Field(
        85, ge=0, le=100, description="A sequence's use of its range: warning at."
    )
    sequence_percent_critical: float = Field(95, ge=0, le=100, description="A sequence's use: critical at.")
    deadlocks: float = Field(0, ge=0, description="New deadlocks since the previous report: warning above.")
    leaked_slot_minutes: float = Field(
        15,
        ge=0,
        description="Concurrency slots held by no live run, unchanged for this long, are flagged.",
    )
    sqlite_free_percent: float = Field(
        20, ge=0, le=100, description="SQLite free pages as % of the file: warning above."
    )

    @model_validator(mode="after")
    def _warning_below_critical(self) -> Thresholds:
        for name in type(self).model_fields:
            critical = f"{name}_critical"
            if critical in type(self).model_fields and getattr(self, name) > getattr(self, critical):
                raise ValueError(
                    f"{name} ({getattr(self, name):g}) must not be above {critical} "
                    f"({getattr(self, critical):g})"
                )
        return self

    @property
    def minimum_bytes(self) -> int:
        return int(self.minimum_megabytes * 1024 * 1024)


class HealthParameters(FlowParameters):
    """The flow's parameters, validated before the database is touched."""

    described_as: ClassVar[str] = "health report parameters"

    top_n: int = Field(20, ge=1, le=1000, description="Tables listed in detail (and confirmed when exact).")
    exact: bool = Field(False, description="Confirm the top tables' bloat with pgstattuple_approx.")
    thresholds: Thresholds = Field(default_factory=Thresholds)
    dry_run: bool = Field(False, description="Accepted for symmetry; the report never writes.")

    @classmethod
    def describe_problem(cls, item: dict[str, Any]) -> str:
        if item["type"] == "extra_forbidden" and item["loc"][:1] == ("thresholds",):
            location = ".".join(str(part) for part in item["loc"])
            return f"{location}: unknown threshold (known thresholds: {', '.join(Thresholds.model_fields)})"
        if item["loc"] == ("thresholds",):  # the warning-below-critical rule names its own fields
            return f"thresholds: {item['msg'].removeprefix('Value error, ')}"
        return super().describe_problem(item)
