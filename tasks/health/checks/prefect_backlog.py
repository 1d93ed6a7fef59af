"""Checks on what Prefect has piled up: runs past retention, stuck runs, concurrency slots no
live run holds (or missing), events older than their retention, events per day, and the
settings of Prefect's own cleanup services.

Runs past retention and stuck runs are counted by the retention and reconcile flows' own
selection code, so the report and those flows always agree (runs past retention by one
count query: the top-level runs, whose subflows go with them; the space their rows take by
the retention dry run's own batches, within a time budget). Prefect's settings come from
`GET /api/admin/settings` of the server that answers (secrets are masked by Prefect; only
the cleanup-related values are read).

Concurrency slots: a deployment's own limit (`deployment:<id>`) is held by that deployment's
Pending, Running and Cancelling runs, read in one snapshot with its slot count (the reconcile
rule `concurrency-slots`'s own query): slots above them that nothing took or gave back for
`leaked_slot_minutes` are leaked, slots below them mean the deployment admits more runs than
its limit. Global limits (`concurrency("name")` in user code, `tag:` limits) record no holder
the database can show (the leases live in the server's memory by default): their slots are
flagged only when no flow or task run is live at all and nothing changed for the threshold.
This report never changes a limit; the advice says how.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.runtime import flow_run

from tasks.health.cleanup_settings import (
    NOT_KNOWN,
    days,
    duration,
    event_trimming,
    listed_settings,
    run_vacuum,
    setting,
)
from tasks.health.framework import Check, HealthContext, InformationOnly, Row, WhenPositive, with_unit
from tasks.health.statements import rows_of
from tasks.prefect_api import PrefectApiError, call, prefect_client
from tasks.reconcile.concurrency import HOLDING_STATES, DeploymentSlots, read_deployment_slots
from tasks.reconcile.passes import count_stuck_runs
from tasks.reports import human_bytes, plural
from tasks.retention.parameters import RetentionParameters
from tasks.retention.report import SPACE_REUSE
from tasks.retention.selection import count_expired_top_level_runs, measure_expired_space

# Counting stuck runs walks the reconcile flow's own selection, which takes time
# proportional to what it finds; the report waits this long for each count so that it stays
# a quick daily look even on a database holding millions of runs.
COUNT_BUDGET_SECONDS = 8.0


async def _within_budget(context: HealthContext, what: str, counting: Awaitable[Any]) -> Any:
    """The count, or None (and a note) when it takes longer than the report can wait."""
    try:
        return await asyncio.wait_for(counting, COUNT_BUDGET_SECONDS)
    except TimeoutError:
        context.report.notes.append(
            f"{what}: not counted; counting took longer than {COUNT_BUDGET_SECONDS:g} s on this database. "
            "A dry run of the flow that acts on them (dry_run=true) reports the exact numbers."
        )
        return None


async def _prefect_settings(context: HealthContext) -> dict[str, Any] | None:
    """The answering server's settings, read once per report; None (and a note) when not readable."""
    if "prefect_settings" not in context.cache:
        try:
            async with prefect_client() as client:
                context.cache["prefect_settings"] = await call(client, "GET", "/admin/settings")
        except PrefectApiError as error:
            context.cache["prefect_settings"] = None
            context.report.notes.append(
                f"Prefect's settings are not readable through the API (GET /admin/settings answered "
                f"{error.status_code or 'nothing'}): event retention and the cleanup services are not shown."
            )
    return context.cache["prefect_settings"]


async def _expired_runs(context: HealthContext) -> list[Row]:
    retention = with_unit(RetentionParameters().older_than_days, "day")
    count = await _within_budget(context, "Runs past the default retention", count_expired_top_level_runs())
    if count is None:
        return [{"object": "top-level flow runs", "value": "not counted", "retention": retention}]
    settings = await _prefect_settings(context)
    server_vacuum = (
        run_vacuum(settings) if settings is not None else "Prefect's own settings are not readable."
    )
    space_bytes, space = await _expired_space(context) if count else (0, "nothing")
    return [
        {
            "object": "top-level flow runs",
            "value": count,
            "retention": retention,
            "space_bytes": space_bytes,
            "space": space,
            "server_vacuum": server_vacuum,
        }
    ]


async def _expired_space(context: HealthContext) -> tuple[int | None, str]:
    """The space the expired runs' rows take, as the retention dry run measures it: every
    batch when they fit in half the budget, else extrapolated from the oldest batches."""
    measured = await _within_budget(
        context,
        "The space of runs past the default retention",
        measure_expired_space(COUNT_BUDGET_SECONDS / 2),
    )
    if measured is None:
        return None, "an unmeasured space (see the notes)"
    if not measured.measures_space:
        return None, "a space not estimated here (measuring rows takes a PostgreSQL database)"
    found = sum(measured.totals.bytes.values())
    if measured.complete:
        return found, f"about {human_bytes(found)} (as the retention dry run measures them)"
    if not measured.top_level_runs:
        return None, "a space not measured within the time budget"
    extrapolated = round(found * measured.candidates / measured.top_level_runs)
    return extrapolated, (
        f"about {human_bytes(extrapolated)} (extrapolated from the oldest {measured.top_level_runs:,} of "
        f"{measured.candidates:,}, whose rows take {human_bytes(found)})"
    )


EXPIRED_RUNS = Check(
    "expired_runs",
    "Runs past the default retention",
    _expired_runs,
    WhenPositive("info"),
    "Finished top-level runs (with their subflows) older than the default retention ({retention}): "
    "{value}; their rows take {space}. " + SPACE_REUSE + " Run the retention deployment "
    "(a dry run first: dry_run=true); {server_vacuum}",
    unit="run",
    shows="{value} past retention",
    backends=("postgresql", "sqlite"),
)


async def _stuck_runs(context: HealthContext) -> list[Row]:
    counts = await _within_budget(context, "Stuck runs", count_stuck_runs())
    if counts is None:
        return [{"object": "all rules", "value": "not counted"}]
    return [{"object": rule, "value": count} for rule, count in counts.items()]


STUCK_RUNS = Check(
    "stuck_runs",
    "Stuck runs",
    _stuck_runs,
    WhenPositive("warning"),
    "Runs the reconcile rule '{object}' finds: {value}. Run the reconcile-stuck-runs deployment "
    "(a dry run first: dry_run=true).",
    unit="stuck run",
    backends=("postgresql", "sqlite"),
)

GLOBAL_LIMITS_SQL = """
SELECT limit_row.name, limit_row."limit" AS slot_limit, limit_row.active, limit_row.active_slots,
       limit_row.updated
FROM concurrency_limit_v2 AS limit_row
WHERE NOT EXISTS (SELECT 1 FROM deployment WHERE deployment.concurrency_limit_id = limit_row.id)
ORDER BY limit_row.name
"""


# Live flow and task runs other than this report's own run.
LIVE_RUNS_SQL = f"""
SELECT (SELECT count(*) FROM flow_run
        WHERE CAST(state_type AS text) IN ({", ".join(f"'{state}'" for state in HOLDING_STATES)})
          AND id IS DISTINCT FROM CAST(:own_run AS uuid))
     + (SELECT count(*) FROM task_run
        WHERE CAST(state_type AS text) = 'RUNNING' AND flow_run_id IS DISTINCT FROM CAST(:own_run AS uuid))
       AS live_runs
"""


LEASE_STORAGE_ADVICE = (
    "To keep leases across server restarts: "
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem "
    "(leases under PREFECT_HOME/concurrency_leases, for a single server process)."
)


async def _concurrency_limits(context: HealthContext) -> list[Row]:
    minutes = context.thresholds.leaked_slot_minutes
    rows = [
        _deployment_row(slots, context.now, minutes)
        for slots in await read_deployment_slots(context.connection)
    ]
    own_run = flow_run.get_id()
    live_runs = (await rows_of(context.connection, LIVE_RUNS_SQL, {"own_run": own_run}))[0]["live_runs"]
    for limit in await rows_of(context.connection, GLOBAL_LIMITS_SQL):
        rows.append(_global_row(limit, live_runs, context.now, minutes))
    return rows


def _quiet_minutes(updated: datetime | None, now: datetime) -> float | None:
    """Minutes since anything took or gave back a slot of the limit."""
    return None if updated is None else (now - updated).total_seconds() / 60


def _deployment_row(slots: DeploymentSlots, now: datetime, minutes: float) -> dict[str, Any]:
    quiet = _quiet_minutes(slots.updated, now)
    excess, shortfall = max(0, -slots.difference), max(0, slots.difference)
    row = {
        "object": f"{slots.limit_name} ({slots.deployment_name})",
        "kind": "deployment",
        "limit": slots.limit,
        "active_slots": slots.active_slots,
        "holders": ", ".join(f"{holder.run_name} ({holder.state_name})" for holder in slots.holders)
        or "none",
        "unchanged_minutes": None if quiet is None else round(quiet, 1),
        "value": 0,
    }
    if not slots.active:
        return row
    if shortfall:
        row["value"] = shortfall
        row["advice"] = (
            f"Runs holding it: {len(slots.holders)}, slots counted: {slots.active_slots}: "
            f"{slots.deployment_name} admits {plural(shortfall, 'run')} beyond its limit of {slots.limit} "
            "(a dead run was ended after the server had taken its slot back). Run the "
            "reconcile-stuck-runs deployment now: its rule concurrency-slots restores the count."
        )
    elif excess and quiet is not None and quiet > minutes:
        row["value"] = excess
        row["advice"] = (
            f"{excess} of {plural(slots.active_slots, 'slot')} held by no run, unchanged for {quiet:.0f} min: "
            f"runs of {slots.deployment_name} wait for them. Run the reconcile-stuck-runs deployment "
            "(a dry run first: dry_run=true): its rule concurrency-slots frees them."
        )
    return row


def _global_row(limit: dict[str, Any], live_runs: int, now: datetime, minutes: float) -> dict[str, Any]:
    quiet = _quiet_minutes(limit["updated"], now)
    row = {
        "object": limit["name"],
        "kind": "global",
        "limit": limit["slot_limit"],
        "active_slots": limit["active_slots"],
        "holders": "not recorded (leases live in the server)",
        "unchanged_minutes": None if quiet is None else round(quiet, 1),
        "value": 0,
    }
    if limit["active"] and limit["active_slots"] and not live_runs and quiet is not None and quiet > minutes:
        row["value"] = limit["active_slots"]
        row["advice"] = (
            f"{plural(limit['active_slots'], 'slot')} taken while no flow or task run is live, unchanged for "
            f"{quiet:.0f} min: leaked (a server restart forgets who held them, and nothing gives "
            "them back). Free them by hand: POST /api/v2/concurrency_limits/decrement with "
            f'{{"names": ["{limit["name"]}"], "slots": {limit["active_slots"]}}}. ' + LEASE_STORAGE_ADVICE
        )
    return row


CONCURRENCY_SLOTS = Check(
    "concurrency_slots",
    "Concurrency slots held by no live run, or missing",
    _concurrency_limits,
    WhenPositive("warning", threshold_keys=("leaked_slot_minutes",)),
    "{advice}",
    unit="slot",
    shows="{value} to correct",
)

OLDEST_EVENT_SQL = "SELECT min(occurred) AS oldest FROM events"


async def _events_past_retention(context: HealthContext) -> list[Row]:
    oldest = _as_datetime((await rows_of(context.connection, OLDEST_EVENT_SQL))[0]["oldest"])
    settings = await _prefect_settings(context)
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
        context.report.notes.append(
            "Events past retention: not judged; this server's settings do not say "
            + ("its event retention." if retention is None else f"how often its {trimming.service} runs.")
        )
        return [{**row, "value": NOT_KNOWN}]
    # The trimming service runs once per interval; an event up to one interval past retention is on schedule.
    overdue = timedelta(0) if oldest is None else context.now - oldest - retention - trimming.interval
    days_overdue = round(max(overdue.total_seconds(), 0) / 86400, 1)
    return [{**row, "value": days_overdue, "overdue": with_unit(days_overdue, "day")}]


def _as_datetime(value: Any) -> datetime | None:
    """Timestamps come back as datetimes from PostgreSQL and as UTC text from SQLite."""
    if value is None or isinstance(value, datetime):
        return value
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


EVENTS_PAST_RETENTION = Check(
    "events_past_retention",
    "Events older than their retention",
    _events_past_retention,
    WhenPositive("warning"),
    "The oldest event ({oldest}) is {overdue} past the event retention ({retention}): Prefect's "
    "event trimming ({trimmed_by}) is not running. {trimming_advice}, or run the retention flow with "
    "events_older_than_days.",
    unit="day",
    shows="{value} overdue",
    backends=("postgresql", "sqlite"),
)

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


async def _events_per_day(context: HealthContext) -> list[Row]:
    since = (context.now - timedelta(days=7)).replace(hour=0, minute=0, second=0, microsecond=0)
    parameter: Any = since if context.backend == "postgresql" else since.strftime("%Y-%m-%d %H:%M:%S.%f")
    return await rows_of(context.connection, EVENTS_PER_DAY_SQL[context.backend], {"since": parameter})


EVENTS_PER_DAY = Check(
    "events_per_day",
    "Events per day (last 7 days)",
    _events_per_day,
    InformationOnly(),
    backends=("postgresql", "sqlite"),
)


async def _vacuum_settings(context: HealthContext) -> list[Row]:
    settings = await _prefect_settings(context)
    return [] if settings is None else listed_settings(settings)


PREFECT_VACUUM_SETTINGS = Check(
    "prefect_vacuum_settings",
    "Prefect's own cleanup settings",
    _vacuum_settings,
    InformationOnly(),
    backends=("postgresql", "sqlite"),
)

CHECKS = (
    EXPIRED_RUNS,
    STUCK_RUNS,
    CONCURRENCY_SLOTS,
    EVENTS_PAST_RETENTION,
    EVENTS_PER_DAY,
    PREFECT_VACUUM_SETTINGS,
)
