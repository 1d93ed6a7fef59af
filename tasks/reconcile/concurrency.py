"""Rule `concurrency-slots`: every deployment concurrency limit holds exactly the slots of
the runs that hold it.

A deployment with a concurrency limit has its own limit row (`deployment:<id>`); a run
takes one of its slots when it enters Pending and gives it back when it leaves Pending,
Running and Cancelling for any other state (a Scheduled `AwaitingRetry` run that carries
its lease id keeps it: the server retries it in the same process). Since Prefect 3.4.11
the server also keeps a lease per slot, in its memory by default, and takes back the slot
of a lease nobody renewed. Two faults follow:

- a server restart forgets the leases: a run that dies afterwards keeps its slot for
  ever, and every later run of the deployment waits (leaked slots: `active_slots` above
  the holders);
- a run whose process died loses its slot to the lease's expiry while it still says
  Running; when it is ended later (by the other reconcile rules, or by hand), the server
  finds no lease and takes a slot back again, one that a live run holds, and the
  deployment admits one run too many (a shortfall: `active_slots` below the holders).

This rule runs last, after the rules that end runs, and makes `active_slots` equal to the
holders: the slot count and the holders are read in one snapshot (one SQL statement; through
the API, the limit read before and after its runs, unchanged), read again just before
acting, and corrected by difference (`POST /v2/concurrency_limits/decrement` and
`/increment`), so that runs taking and releasing slots meanwhile keep their own count. The
increment never goes past the limit; only a limit already over-admitted (more holders than
it allows) gets its count set (`PATCH`), once it is full, so that no run can start while
the rest is restored. Global limits (`concurrency("name")` in user code, `tag:` limits) are
never touched: nothing records who holds them (the health report lists them).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import PrefectClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.database import connect
from tasks.prefect_api import PrefectApiError, call, paginate, prefect_client
from tasks.reconcile.actions import emit_maintenance_events, error_reason, maintenance_event
from tasks.reconcile.detect import DetectionSource, RunScope
from tasks.reconcile.parameters import ReconcileParameters
from tasks.reconcile.report import RuleReport, SlotCorrection, SlotHolder
from tasks.reconcile.rules import Rule

CORRECTED_EVENT = "prefect-maintenance.concurrency.corrected"
# The states in which a run holds its deployment's slot.
HOLDING_STATES = ("PENDING", "RUNNING", "CANCELLING")
RETRYING_STATE_NAME = "AwaitingRetry"
DEPLOYMENT_LIMIT_PREFIX = "deployment:"
# Through the API a limit that changed while its runs were read is read again this often.
API_READ_ATTEMPTS = 3
# A correction is re-read and applied at most this often when runs keep moving under it.
CORRECTION_ATTEMPTS = 3


@dataclass(frozen=True)
class DeploymentSlots:
    """One deployment limit and the runs holding it, as seen at one moment."""

    limit_id: UUID
    limit_name: str
    limit: int
    active: bool
    active_slots: int
    updated: datetime | None
    deployment_id: UUID
    deployment_name: str
    deployment_tags: tuple[str, ...]
    work_queue_name: str | None
    flow_name: str
    holders: tuple[SlotHolder, ...]

    @property
    def difference(self) -> int:
        """Slots to add (positive: a shortfall) or to free (negative: leaked slots)."""
        return len(self.holders) - self.active_slots

    def in_scope(self, scope: RunScope) -> bool:
        return (
            (not scope.deployment_ids or self.deployment_id in scope.deployment_ids)
            and (not scope.flow_names or self.flow_name in scope.flow_names)
            and (not scope.tags or bool(set(scope.tags) & set(self.deployment_tags)))
            and (not scope.work_queue_names or self.work_queue_name in scope.work_queue_names)
        )


# One statement: PostgreSQL reads the slot counts and the holders in one snapshot, and a
# run's slot changes in the same transaction as its state.
DEPLOYMENT_SLOTS_SQL = f"""
SELECT limit_row.id AS limit_id, limit_row.name AS limit_name, limit_row."limit" AS slot_limit,
       limit_row.active, limit_row.active_slots, limit_row.updated,
       deployment.id AS deployment_id, flow.name || '/' || deployment.name AS deployment_name,
       CAST(deployment.tags AS text) AS deployment_tags, deployment.work_queue_name,
       flow.name AS flow_name,
       (SELECT json_agg(json_build_object(
                   'run_id', run.id, 'run_name', run.name, 'state_name', run.state_name,
                   'since', run.state_timestamp) ORDER BY run.state_timestamp, run.id)
        FROM flow_run AS run
        LEFT JOIN flow_run_state AS state ON state.id = run.state_id
        WHERE run.deployment_id = deployment.id
          AND (CAST(run.state_type AS text) IN ({", ".join(f"'{state}'" for state in HOLDING_STATES)})
               OR (CAST(run.state_type AS text) = 'SCHEDULED' AND run.state_name = '{RETRYING_STATE_NAME}'
                   AND state.state_details ->> 'deployment_concurrency_lease_id' IS NOT NULL))
       ) AS holders
FROM concurrency_limit_v2 AS limit_row
JOIN deployment ON deployment.concurrency_limit_id = limit_row.id
JOIN flow ON flow.id = deployment.flow_id
WHERE {{condition}}
ORDER BY deployment_name, limit_row.id
"""


async def read_deployment_slots(
    connection: AsyncConnection, limit_ids: Iterable[UUID] | None = None
) -> list[DeploymentSlots]:
    """Every deployment limit (or those of `limit_ids`) with its holders, by SQL."""
    if limit_ids is None:
        statement, values = DEPLOYMENT_SLOTS_SQL.format(condition="TRUE"), {}
    else:
        statement = DEPLOYMENT_SLOTS_SQL.format(condition="limit_row.id = ANY(CAST(:limit_ids AS uuid[]))")
        values = {"limit_ids": [str(limit_id) for limit_id in limit_ids]}
    rows = (await connection.execute(text(statement), values)).mappings().all()
    return [
        DeploymentSlots(
            limit_id=row["limit_id"],
            limit_name=row["limit_name"],
            limit=row["slot_limit"],
            active=row["active"],
            active_slots=row["active_slots"],
            updated=row["updated"],
            deployment_id=row["deployment_id"],
            deployment_name=row["deployment_name"],
            deployment_tags=tuple(json.loads(row["deployment_tags"] or "[]")),
            work_queue_name=row["work_queue_name"],
            flow_name=row["flow_name"],
            holders=tuple(SlotHolder.model_validate(holder) for holder in row["holders"] or ()),
        )
        for row in rows
    ]


async def _slots_from_api(client: PrefectClient, limit_ids: Iterable[UUID] | None) -> list[DeploymentSlots]:
    """The same through the API: the limits, their deployments' runs, the limits again. A limit
    whose row changed meanwhile (`updated` moves with every slot taken or released) is read
    again; one that keeps changing is left out (the next pass looks again)."""
    wanted = set(limit_ids) if limit_ids is not None else None
    deployments = {}
    async for row in paginate(client, "/deployments/filter", {}):
        limit = row.get("global_concurrency_limit")
        if limit and (wanted is None or UUID(limit["id"]) in wanted):
            deployments[UUID(limit["id"])] = row
    flow_names = {}
    for flow_id in {row["flow_id"] for row in deployments.values()}:
        flow_names[flow_id] = (await call(client, "GET", f"/flows/{flow_id}"))["name"]
    consistent: dict[UUID, DeploymentSlots] = {}
    pending = set(deployments)
    for _ in range(API_READ_ATTEMPTS):
        if not pending:
            break
        before = await _limit_rows(client, pending)
        holders = await _holders_from_api(client, [deployments[limit_id]["id"] for limit_id in pending])
        after = await _limit_rows(client, pending)
        for limit_id in list(pending):
            first, second = before.get(limit_id), after.get(limit_id)
            if first is None or second is None:
                pending.discard(limit_id)  # the limit is gone
                continue
            if (first["active_slots"], first["updated"]) != (second["active_slots"], second["updated"]):
                continue
            deployment = deployments[limit_id]
            consistent[limit_id] = DeploymentSlots(
                limit_id=limit_id,
                limit_name=second["name"],
                limit=second["limit"],
                active=second["active"],
                active_slots=second["active_slots"],
                updated=datetime.fromisoformat(second["updated"]) if second.get("updated") else None,
                deployment_id=UUID(deployment["id"]),
                deployment_name=f"{flow_names[deployment['flow_id']]}/{deployment['name']}",
                deployment_tags=tuple(deployment.get("tags") or ()),
                work_queue_name=deployment.get("work_queue_name"),
                flow_name=flow_names[deployment["flow_id"]],
                holders=tuple(holders.get(deployment["id"], ())),
            )
            pending.discard(limit_id)
    return sorted(consistent.values(), key=lambda slots: (slots.deployment_name, str(slots.limit_id)))


async def _limit_rows(client: PrefectClient, limit_ids: set[UUID]) -> dict[UUID, dict[str, Any]]:
    rows = {}
    async for row in paginate(client, "/v2/concurrency_limits/filter", {}):
        if UUID(row["id"]) in limit_ids:
            rows[UUID(row["id"])] = row
    return rows


async def _holders_from_api(client: PrefectClient, deployment_ids: list[str]) -> dict[str, list[SlotHolder]]:
    holders: dict[str, list[SlotHolder]] = {}
    deployments = {"deployment_id": {"any_": deployment_ids}}
    holding = {"flow_runs": {**deployments, "state": {"type": {"any_": list(HOLDING_STATES)}}}}
    retrying = {"flow_runs": {**deployments, "state": {"name": {"any_": [RETRYING_STATE_NAME]}}}}
    for body in (holding, retrying):
        async for row in paginate(client, "/flow_runs/filter", {**body, "sort": "ID_DESC"}):
            state = row.get("state") or {}
            if state.get("type") == "SCHEDULED" and not (state.get("state_details") or {}).get(
                "deployment_concurrency_lease_id"
            ):
                continue
            holders.setdefault(row["deployment_id"], []).append(
                SlotHolder(
                    run_id=row["id"],
                    run_name=row["name"],
                    state_name=row.get("state_name"),
                    since=state.get("timestamp"),
                )
            )
    for runs in holders.values():
        runs.sort(key=lambda holder: (holder.since is None, holder.since, str(holder.run_id)))
    return holders


async def read_slots(
    source: DetectionSource, client: PrefectClient, limit_ids: Iterable[UUID] | None = None
) -> list[DeploymentSlots]:
    """Every deployment limit with its holders, by the pass's detection source."""
    if source.kind == "sql":
        async with connect(read_only=True) as connection:
            return await read_deployment_slots(connection, limit_ids)
    return await _slots_from_api(client, limit_ids)


@task(name="reconcile-concurrency-slots", cache_policy=NO_CACHE)
async def reconcile_concurrency_slots(
    rule: Rule,
    parameters: ReconcileParameters,
    scope: RunScope,
    source: DetectionSource,
    budget: int,
    leave: Collection[UUID] = (),
) -> RuleReport:
    """Make every deployment limit in scope hold exactly its runs' slots; at most `budget`
    corrections, the rest are left for the next pass. The limits of `leave` are not looked at
    (a dry run's earlier look in the same pass already counted them)."""
    report = RuleReport.of(rule, parameters)
    async with prefect_client() as client:
        seen = [
            slots
            for slots in await read_slots(source, client)
            if slots.in_scope(scope) and slots.limit_id not in leave
        ]
        inactive = [slots for slots in seen if not slots.active and slots.difference]
        if inactive:
            report.notes.append(
                f"{len(inactive)} inactive limits were not looked at (the server neither takes nor "
                f"frees their slots): {', '.join(slots.deployment_name for slots in inactive)}"
            )
        found = [slots for slots in seen if slots.active and slots.difference]
        report.found = len(found)
        corrected: list[SlotCorrection] = []
        for position, detected in enumerate(found):
            if position >= max(budget, 0):
                report.record_slots(
                    _correction(detected, detected, "left", "max_actions reached in this pass")
                )
                continue
            try:
                correction = await _correct(client, source, detected, parameters.dry_run)
            except Exception as error:  # one limit's failure must not stop the others
                correction = _correction(detected, detected, "skipped", error_reason(error))
            report.record_slots(correction)
            if correction.change and not parameters.dry_run:
                corrected.append(correction)
        await _emit_corrected(client, rule, corrected)
    return report


async def _correct(
    client: PrefectClient, source: DetectionSource, detected: DeploymentSlots, dry_run: bool
) -> SlotCorrection:
    """Re-read the limit, then correct it by the difference seen in that re-read; again while
    runs moving meanwhile leave it off (at most CORRECTION_ATTEMPTS changes)."""
    first: DeploymentSlots | None = None
    applied: list[str] = []
    for attempt in range(CORRECTION_ATTEMPTS + 1):
        current = await _reread(client, source, detected)
        if current is None:
            return _correction(detected, detected, "skipped", "the limit is gone or kept changing", applied)
        first = first or current
        if current.difference == 0:
            if applied:
                return _correction(first, current, "fixed", None, applied)
            return _correction(detected, current, "skipped", "its slots match its runs again")
        if not applied and (current.difference > 0) != (detected.difference > 0):
            return _correction(detected, current, "skipped", "its slots changed direction since detection")
        if dry_run:
            return _correction(current, current, "would fix", None, [_describe_change(current)])
        if attempt == CORRECTION_ATTEMPTS:
            break
        change = await _apply(client, current)
        if change:
            applied.append(change)
    off = "slot" if abs(current.difference) == 1 else "slots"
    reason = f"still {current.difference:+d} {off} off while runs kept moving; the next pass looks again"
    return _correction(first, current, "skipped", reason, applied)


async def _reread(
    client: PrefectClient, source: DetectionSource, slots: DeploymentSlots
) -> DeploymentSlots | None:
    again = await read_slots(source, client, [slots.limit_id])
    return again[0] if again else None


def _describe_change(slots: DeploymentSlots) -> str:
    difference = slots.difference
    if difference < 0:
        return f"decrement {-difference}"
    fits = max(0, min(difference, slots.limit - slots.active_slots))
    if fits == difference:
        return f"increment {difference}"
    return (f"increment {fits}, then " if fits else "") + f"set to {len(slots.holders)} (over-admitted)"


async def _apply(client: PrefectClient, slots: DeploymentSlots) -> str | None:
    """One change by the difference; what was done (None: nothing, read again)."""
    names = {"names": [slots.limit_name]}
    difference = slots.difference
    if difference < 0:
        answer = await call(
            client, "POST", "/v2/concurrency_limits/decrement", json={**names, "slots": -difference}
        )
        _require_limit(answer, slots)
        return f"decrement {-difference}"
    fits = max(0, min(difference, slots.limit - slots.active_slots))
    if fits:
        try:
            answer = await call(
                client, "POST", "/v2/concurrency_limits/increment", json={**names, "slots": fits}
            )
        except PrefectApiError as error:
            if error.status_code != 423:
                raise
            return None  # a run took a slot since the re-read: the next attempt reads it again
        _require_limit(answer, slots)
        return f"increment {fits}"
    # More runs hold the limit than it allows, and it is full: no run can start now, so
    # setting the count loses nothing but a release racing this write (the next pass frees it).
    await call(
        client, "PATCH", f"/v2/concurrency_limits/{slots.limit_id}", json={"active_slots": len(slots.holders)}
    )
    return f"set to {len(slots.holders)} (over-admitted)"


def _require_limit(answer: Any, slots: DeploymentSlots) -> None:
    # The routes answer 200 with an empty list for a limit that is gone or inactive.
    if not any(UUID(row["id"]) == slots.limit_id for row in answer or ()):
        raise RuntimeError(f"the server changed nothing: limit {slots.limit_name} is gone or inactive")


def _correction(
    before: DeploymentSlots,
    after: DeploymentSlots,
    outcome: str,
    reason: str | None,
    changes: list[str] | None = None,
) -> SlotCorrection:
    return SlotCorrection(
        limit_id=before.limit_id,
        limit_name=before.limit_name,
        limit=before.limit,
        deployment_id=before.deployment_id,
        deployment_name=before.deployment_name,
        slots_before=before.active_slots,
        slots_after=len(after.holders) if outcome == "would fix" else after.active_slots,
        holders=list(after.holders),
        change="; ".join(changes or ()),
        outcome=outcome,
        reason=reason,
    )


async def _emit_corrected(client: PrefectClient, rule: Rule, corrections: list[SlotCorrection]) -> None:
    await emit_maintenance_events(
        client,
        [
            maintenance_event(
                CORRECTED_EVENT,
                resource={
                    "prefect.resource.id": f"prefect.concurrency-limit.{correction.limit_id}",
                    "prefect.resource.name": correction.limit_name,
                },
                rule=rule,
                related=[
                    {
                        "prefect.resource.id": f"prefect.deployment.{correction.deployment_id}",
                        "prefect.resource.role": "deployment",
                        "prefect.resource.name": correction.deployment_name,
                    }
                ],
                payload={
                    "rule": rule.name,
                    "slots_before": correction.slots_before,
                    "slots_after": correction.slots_after,
                    "change": correction.change,
                    "holders": [str(holder.run_id) for holder in correction.holders],
                },
            )
            for correction in corrections
        ],
    )
