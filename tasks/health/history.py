"""The previous report, read back from its table artifact, for growth and new deadlocks.

Each report leaves a table artifact (`db-health-report-tables`) with one row per table and
the deadlock counter in its description; the next report reads the latest one before
publishing its own. Reading it is the only thing the report asks of Prefect's history.
"""

from __future__ import annotations

import json
import re
from datetime import datetime

from tasks.health.models import HealthReport, PreviousReport
from tasks.prefect_api import PrefectApiError, call, prefect_client

TABLE_KEY = "db-health-report-tables"
DEADLOCKS_PATTERN = re.compile(r"deadlocks counted: (\d+)")


def table_artifact_description(report: HealthReport) -> str:
    """The description the next report reads the deadlock counter back from."""
    counted = f"; deadlocks counted: {report.deadlocks}" if report.deadlocks is not None else ""
    return f"Per-table figures of the database health report of {report.generated_at:%Y-%m-%d %H:%M} UTC{counted}"


async def read_previous_report() -> PreviousReport | None:
    try:
        async with prefect_client() as client:
            artifact = await call(client, "GET", f"/artifacts/{TABLE_KEY}/latest")
    except PrefectApiError as error:
        if error.status_code == 404:
            return None
        raise
    rows = artifact.get("data")
    rows = json.loads(rows) if isinstance(rows, str) else rows
    if not isinstance(rows, list):
        return None
    deadlocks = DEADLOCKS_PATTERN.search(artifact.get("description") or "")
    return PreviousReport(
        created=datetime.fromisoformat(artifact["created"]),
        table_bytes={
            row["table"]: int(row["total_bytes"])
            for row in rows
            if isinstance(row, dict) and "table" in row and isinstance(row.get("total_bytes"), int)
        },
        deadlocks=int(deadlocks.group(1)) if deadlocks else None,
    )


def apply_growth(report: HealthReport, previous: PreviousReport | None) -> None:
    if previous is None:
        return
    report.previous_report_at = previous.created
    for table in report.tables:
        if table.name in previous.table_bytes:
            table.growth_bytes = table.total_bytes - previous.table_bytes[table.name]
