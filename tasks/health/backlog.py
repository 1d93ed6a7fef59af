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

from pydantic import TypeAdapter

from tasks.health.statements import rows_of
from tasks.prefect_api import PrefectApiError, call, prefect_client
from tasks.reconcile.detect import count_stuck_runs
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

_durations = TypeAdapter(timedelta)


async def expired_runs(probe: Probe) -> list[dict[str, Any]]:
    retention = f"{RetentionParameters().older_than_days:g} days"
    count = await _within_budget(probe, "Runs past the default retention", count_expired_top_level_runs())
    if count is None:
        return [{"object": "top-level flow runs", "value": "not counted", "retention": retention}]
    settings = await prefect_settings(probe)
    vacuum = (settings or {}).get("server", {}).get("services", {}).get("db_vacuum", {})
    if "flow_runs" in set(vacuum.get("enabled") or ()):
        server_vacuum = (
            f"Prefect's db_vacuum service also deletes top-level runs older than "
            f"{_days(vacuum.get('retention_period'))}."
        )
    else:
        server_vacuum = "Prefect's own db_vacuum service does not delete runs on this server."
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
    retention = _durations.validate_python(settings["server"]["events"]["retention_period"])
    # The event vacuum runs once per loop; an event up to one loop past retention is on schedule.
    loop = timedelta(seconds=settings["server"]["services"]["db_vacuum"].get("loop_seconds", 3600))
    overdue = timedelta(0) if oldest is None else probe.now - oldest - retention - loop
    return [
        {
            "object": "events",
            "value": round(max(overdue.total_seconds(), 0) / 86400, 1),
            "oldest": oldest.isoformat(timespec="minutes") if oldest else "none",
            "retention": _days(settings["server"]["events"]["retention_period"]),
        }
    ]


async def events_per_day(probe: Probe) -> list[dict[str, Any]]:
    since = (probe.now - timedelta(days=7)).replace(hour=0, minute=0, second=0, microsecond=0)
    parameter: Any = since if probe.backend == "postgresql" else since.strftime("%Y-%m-%d %H:%M:%S.%f")
    return await rows_of(probe.connection, EVENTS_PER_DAY_SQL[probe.backend], {"since": parameter})


async def vacuum_settings(probe: Probe) -> list[dict[str, Any]]:
    settings = await prefect_settings(probe)
    if settings is None:
        return []
    server = settings["server"]
    services = server["services"]
    vacuum = services["db_vacuum"]
    listed = {
        "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": ", ".join(sorted(vacuum.get("enabled") or []))
        or "(none)",
        "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": _days(vacuum.get("retention_period")),
        "PREFECT_SERVER_SERVICES_DB_VACUUM_EVENT_RETENTION_OVERRIDES": ", ".join(
            f"{name}: {_days(period)}"
            for name, period in (vacuum.get("event_retention_overrides") or {}).items()
        )
        or "(none)",
        "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": _days(server["events"].get("retention_period")),
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": services["event_persister"].get("enabled"),
        "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": services["cancellation_cleanup"].get(
            "enabled"
        ),
        "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": services["late_runs"].get("enabled"),
        "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": server["database"]["sqlalchemy"].get("pool_size"),
        "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": server["database"]["sqlalchemy"].get(
            "max_overflow"
        ),
    }
    return [{"object": name, "value": str(value)} for name, value in listed.items()]


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


def _days(period: Any) -> str:
    if period is None:
        return "-"
    seconds = _durations.validate_python(period).total_seconds()
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds / 3600:g} hours"
