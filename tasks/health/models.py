"""The health report: per-table and per-index figures, flags, and one verdict."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from tasks.health.bloat import Bloat

Severity = Literal["info", "warning", "critical"]
HealthVerdict = Literal["ok", "warning", "critical"]
Backend = Literal["postgresql", "sqlite"]

# How a bloat figure was obtained, from the cheapest to the most exact.
BloatMethod = Literal["estimate", "pgstattuple_approx", "pgstattuple", "dbstat"]
# How a table's rows were counted, and which of its two counts (live, dead) that makes exact:
# PostgreSQL's statistics estimate both; count(*) counts the live rows; pgstattuple_approx
# counts the dead rows and estimates the live ones on pages it skips; pgstattuple counts both.
RowsMethod = Literal["statistics", "count", "pgstattuple_approx", "pgstattuple"]
EXACT_ROWS: dict[RowsMethod, tuple[bool, bool]] = {
    "statistics": (False, False),
    "count": (True, False),
    "pgstattuple_approx": (False, True),
    "pgstattuple": (True, True),
}

# The tables Prefect's maintenance guide says grow fastest; always listed in the report.
PREFECT_BIG_TABLES = (
    "events",
    "event_resources",
    "log",
    "flow_run",
    "task_run",
    "flow_run_state",
    "task_run_state",
)


class Flag(BaseModel):
    """One red (or amber, or informational) flag, with what to do about it."""

    severity: Severity
    check: str
    object: str
    value: float | str | None = None
    threshold: float | None = None
    unit: str = ""
    shown: str = Field("-", description="The value as the report shows it: with its unit and what it is.")
    advice: str


class BloatFigures(BaseModel):
    """Bloat of a table or an index, and how it was obtained."""

    bloat_percent: float | None = Field(
        None, description="Wasted space as % of the space the live rows need (100% = twice the needed size)."
    )
    bloat_bytes: int | None = None
    bloat_method: BloatMethod | None = None

    def record_bloat(self, bloat: Bloat, method: BloatMethod) -> None:
        self.bloat_percent, self.bloat_bytes, self.bloat_method = bloat.percent, bloat.bytes, method


class TableFigures(BloatFigures):
    name: str
    total_bytes: int
    heap_bytes: int
    index_bytes: int
    toast_bytes: int = 0
    live_rows: int | None = None
    dead_rows: int | None = None
    dead_percent: float | None = None
    rows_method: RowsMethod = "statistics"
    estimated_bloat_percent: float | None = Field(
        None, description="The statistics-based estimate, kept when pgstattuple confirmed the table."
    )
    last_vacuum: datetime | None = None
    last_autovacuum: datetime | None = None
    last_analyze: datetime | None = None
    last_autoanalyze: datetime | None = None
    autovacuum_enabled: bool = True
    vacuum_due: bool = False
    changes_since_vacuum: int | None = None
    prefect_table: bool = False
    growth_bytes: int | None = Field(None, description="Growth of total_bytes since the previous report.")

    def record_rows(self, live: int | None, dead: int | None, method: RowsMethod) -> None:
        self.live_rows, self.dead_rows, self.rows_method = live, dead, method
        counted = (live or 0) + (dead or 0)
        self.dead_percent = round(100.0 * dead / counted, 1) if dead is not None and counted > 0 else None

    @property
    def live_rows_exact(self) -> bool:
        return EXACT_ROWS[self.rows_method][0]

    @property
    def dead_rows_exact(self) -> bool:
        return EXACT_ROWS[self.rows_method][1]


class IndexFigures(BloatFigures):
    name: str
    table: str
    method: str
    bytes: int
    scans: int | None = None
    unique: bool = False
    valid: bool = True


class PreviousReport(BaseModel):
    """What the previous `db-health-report` left behind, for growth and new deadlocks."""

    created: datetime
    table_bytes: dict[str, int]
    deadlocks: int | None = None


class HealthReport(BaseModel):
    backend: Backend | None
    database: str = Field(description="The database, described without secrets.")
    server_version: str | None = None
    generated_at: datetime
    seconds: float = 0.0
    database_bytes: int | None = None
    deadlocks: int | None = Field(
        None, description="Deadlocks PostgreSQL counted since its statistics reset."
    )
    verdict: HealthVerdict = "ok"
    flags: list[Flag] = Field(default_factory=list)
    tables: list[TableFigures] = Field(default_factory=list)
    indexes: list[IndexFigures] = Field(default_factory=list)
    findings: dict[str, list[dict[str, Any]]] = Field(
        default_factory=dict, description="What each check saw, by check name, flagged or not."
    )
    notes: list[str] = Field(default_factory=list, description="What the report could not see, and why.")
    check_seconds: dict[str, float] = Field(default_factory=dict, description="How long each check took.")
    previous_report_at: datetime | None = None
    exact: bool = False
    top_n: int = 20
    minimum_megabytes: float = Field(
        10, description="Tables smaller than this are counted exactly and never flagged for their size."
    )


SEVERITY_ORDER: dict[Severity, int] = {"critical": 0, "warning": 1, "info": 2}


def verdict_of(flags: list[Flag]) -> HealthVerdict:
    """The worst severity among the flags; informational flags never change the verdict."""
    severities = {flag.severity for flag in flags}
    if "critical" in severities:
        return "critical"
    if "warning" in severities:
        return "warning"
    return "ok"
