"""Concurrency limits: every limit with its active slots and, where they can be known, the
runs holding them; slots that no live run holds are flagged.

A deployment's own limit (`deployment:<id>`) is held by that deployment's Pending, Running
and Cancelling runs, read in one snapshot with its slot count (the reconcile rule
`concurrency-slots`'s own query): slots above them that nothing took or gave back for
`leaked_slot_minutes` are leaked, slots below them mean the deployment admits more runs
than its limit. Global limits (`concurrency("name")` in user code, `tag:` limits) record no
holder the database can show (the leases live in the server's memory by default): their
slots are flagged only when no flow or task run is live at all and nothing changed for the
threshold. This report never changes a limit; the advice says how.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from prefect.runtime import flow_run

from tasks.health.statements import rows_of
from tasks.reconcile.concurrency import HOLDING_STATES, DeploymentSlots, read_deployment_slots

if TYPE_CHECKING:
    from tasks.health.checks import Probe

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


async def concurrency_limits(probe: Probe) -> list[dict[str, Any]]:
    minutes = probe.thresholds.leaked_slot_minutes
    rows = [
        _deployment_row(slots, probe.now, minutes) for slots in await read_deployment_slots(probe.connection)
    ]
    own_run = flow_run.get_id()
    live_runs = (await rows_of(probe.connection, LIVE_RUNS_SQL, {"own_run": own_run}))[0]["live_runs"]
    for limit in await rows_of(probe.connection, GLOBAL_LIMITS_SQL):
        rows.append(_global_row(limit, live_runs, probe.now, minutes))
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
            f"{len(slots.holders)} runs hold it but {slots.active_slots} slots are counted: "
            f"{slots.deployment_name} admits {shortfall} run(s) beyond its limit of {slots.limit} "
            "(a dead run was ended after the server had taken its slot back). Run the "
            "reconcile-stuck-runs deployment now: its rule concurrency-slots restores the count."
        )
    elif excess and quiet is not None and quiet > minutes:
        row["value"] = excess
        row["advice"] = (
            f"{excess} of {slots.active_slots} slots are held by no run, unchanged for {quiet:.0f} min: "
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
            f"{limit['active_slots']} slots taken while no flow or task run is live, unchanged for "
            f"{quiet:.0f} min: leaked (a server restart forgets who held them, and nothing gives "
            "them back). Free them by hand: POST /api/v2/concurrency_limits/decrement with "
            f'{{"names": ["{limit["name"]}"], "slots": {limit["active_slots"]}}}. ' + LEASE_STORAGE_ADVICE
        )
    return row
