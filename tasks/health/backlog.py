"""What Prefect has piled up: runs past retention, stuck runs, old events, and the settings
of Prefect's own cleanup services.

Runs past retention and stuck runs are counted by the retention and reconcile flows' own
selection code, so the report and those flows always agree (runs past retention by one
count query: the top-level runs, whose subflows go with them). Prefect's settings come from
`GET /api/admin/settings` of the server that answers (secrets are masked by Prefect; only
the cleanup-related values are read).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from tasks.health.cleanup_settings import (
    NOT_KNOWN,
    days,
    duration,
    event_trimming,
    listed_settings,
    run_vacuum,
    setting,
)
from tasks.health.statements import rows_of
from tasks.prefect_api import PrefectApiError, call, prefect_client
from tasks.reconcile.passes import count_stuck_runs
from tasks.retention.parameters import RetentionParameters
from tasks.retention.selection import count_expired_top_level_runs

if TYPE_CHECKING:
    from tasks.health.checks import Probe

OLDEST_EVENT_SQL = "SELECT min(occurred) AS oldest FROM events"

EVENTS_PER_DAY_SQL = {
    "postgresql": """
        SELECT to_char(date_trunc('day', occurred), 'YYYY-MM-DD') AS object, count(*) AS value
        FROM events WHERE occurred >= :since GROUP BY 1 ORDER BY 1
    """,
    # Prefect stores SQLite timestamps as 'YYYY-MM-DD HH:MM:SS.ffffff' text in UTC.
    "sqlite": """
        SELECT date(occurred) AS object, count(*) AS value
        FROM events WHERE occurred >= :since GROUP BY 1 ORDER BY 1
    """,
}

# Counting stuck runs walks the reconcile flow's own selection, which takes time
# proportional to what it finds; the report waits this long for each count so that it stays
# a quick daily look even on a database holding millions of runs.
COUNT_BUDGET_SECONDS = 8.0


async def expired_runs(probe: Probe) -> list[dict[str, Any]]:
    retention = f"{RetentionParameters().older_than_days:g} days"
    count = await _within_budget(probe, "Runs past the default retention", count_expired_top_level_runs())
    if count is None:
        return [{"object": "top-level flow runs", "value": "not counted", "retention": retention}]
    settings = await prefect_settings(probe)
    server_vacuum = (
        run_vacuum(settings) if settings is not None else "Prefect's own settings are not readable."
    )
    return [
        {
            "object": "top-level flow runs",
            "value": count,
            "retention": retention,
            "server_vacuum": server_vacuum,
        }
    ]


async def stuck_runs(probe: Probe) -> list[dict[str, Any]]:
    counts = await _within_budget(probe, "Stuck runs", count_stuck_runs())
    if counts is None:
        return [{"object": "all rules", "value": "not counted"}]
    return [{"object": rule, "value": count} for rule, count in counts.items()]


async def events_past_retention(probe: Probe) -> list[dict[str, Any]]:
    oldest = _as_datetime((await rows_of(probe.connection, OLDEST_EVENT_SQL))[0]["oldest"])
    settings = await prefect_settings(probe)
    if settings is None:
        return []
    trimming = event_trimming(settings)
    retention = duration(setting(settings, "server.events.retention_period"))
    row = {
        "object": "events",
        "oldest": oldest.isoformat(timespec="minutes") if oldest else "none",
        "retention": days(retention),
        "trimmed_by": trimming.service,
        "trimming_advice": trimming.advice,
    }
    if retention is None or trimming.interval is None:
        probe.report.notes.append(
            "Events past retention: not judged; this server's settings do not say "
            + ("its event retention." if retention is None else f"how often its {trimming.service} runs.")
        )
        return [{**row, "value": NOT_KNOWN}]
    # The trimming service runs once per interval; an event up to one interval past retention is on schedule.
    overdue = timedelta(0) if oldest is None else probe.now - oldest - retention - trimming.interval
    return [{**row, "value": round(max(overdue.total_seconds(), 0) / 86400, 1)}]


async def events_per_day(probe: Probe) -> list[dict[str, Any]]:
    since = (probe.now - timedelta(days=7)).replace(hour=0, minute=0, second=0, microsecond=0)
    parameter: Any = since if probe.backend == "postgresql" else since.strftime("%Y-%m-%d %H:%M:%S.%f")
    return await rows_of(probe.connection, EVENTS_PER_DAY_SQL[probe.backend], {"since": parameter})


async def vacuum_settings(probe: Probe) -> list[dict[str, Any]]:
    settings = await prefect_settings(probe)
    return [] if settings is None else listed_settings(settings)


async def prefect_settings(probe: Probe) -> dict[str, Any] | None:
    """The answering server's settings, read once per report; None (and a note) when not readable."""
    if "prefect_settings" not in probe.cache:
        try:
            async with prefect_client() as client:
                probe.cache["prefect_settings"] = await call(client, "GET", "/admin/settings")
        except PrefectApiError as error:
            probe.cache["prefect_settings"] = None
            probe.report.notes.append(
                f"Prefect's settings are not readable through the API (GET /admin/settings answered "
                f"{error.status_code or 'nothing'}): event retention and the cleanup services are not shown."
            )
    return probe.cache["prefect_settings"]


async def _within_budget(probe: Probe, what: str, counting: Awaitable[Any]) -> Any:
    """The count, or None (and a note) when it takes longer than the report can wait."""
    try:
        return await asyncio.wait_for(counting, COUNT_BUDGET_SECONDS)
    except TimeoutError:
        probe.report.notes.append(
            f"{what}: not counted; counting took longer than {COUNT_BUDGET_SECONDS:g} s on this database. "
            "A dry run of the flow that acts on them (dry_run=true) reports the exact numbers."
        )
        return None


def _as_datetime(value: Any) -> datetime | None:
    """Timestamps come back as datetimes from PostgreSQL and as UTC text from SQLite."""
    if value is None or isinstance(value, datetime):
        return value
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
