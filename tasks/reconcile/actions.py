"""Ending stuck runs, only through the Prefect API.

For each batch: re-read the runs, skip any whose state changed since detection, then set
each remaining run's state (`force` only where the rule needs it) or delete it, a few
requests in flight at once, and emit one `prefect-maintenance.run.reconciled` event per
fixed run so users can hang notifications on it. An error on one run is recorded on that
run and the others go on. A dry run does the same reads and stops short of every write.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from uuid import UUID, uuid4

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import State, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.exceptions import ObjectNotFound

from tasks.database import describe_error
from tasks.prefect_api import (
    BULK_FLOW_RUN_ROUTES,
    BULK_LIMIT,
    RunKind,
    call,
    chunks,
    prefect_client,
    read_every_row,
    read_runs_by_id,
    server_has,
)
from tasks.reconcile.detect import Candidate, Findings, RunScope, scope_filters
from tasks.reconcile.parameters import ReconcileParameters
from tasks.reconcile.report import Outcome, RuleReport, RunAction
from tasks.reconcile.rules import DELETE, STATE_NAMES, Rule, Verdict
from tasks.reconcile.unreadable import UnreadableRun, find_unreadable_running_runs
from tasks.reports import plural
from tasks.settings import get_settings

RECONCILED_EVENT = "prefect-maintenance.run.reconciled"


def state_message(rule: Rule, seen: str) -> str:
    return f"Reconciled by prefect-maintenance, rule {rule.name}: {seen}."


@task(name="end-stuck-runs", task_run_name="end-{rule.name}", cache_policy=NO_CACHE)
async def end_stuck_runs(
    rule: Rule, findings: Findings, parameters: ReconcileParameters, scope: RunScope, budget: int
) -> RuleReport:
    """Act on at most `budget` of the rule's findings; the rest are reported as left."""
    report = RuleReport.of(rule, parameters)
    report.found = findings.found_by(rule)
    report.unreadable = findings.unreadable
    budget = max(budget, 0)
    acting, left = findings.candidates[:budget], findings.candidates[budget:]
    async with prefect_client() as client:
        for batch in chunks(acting, BULK_LIMIT):
            try:
                await _act_on_batch(client, rule, batch, parameters.dry_run, report)
            except Exception as error:  # a failed re-read skips its batch, not the pass
                report.notes.append(f"a batch of {plural(len(batch), 'run')} failed: {error_reason(error)}")
                recorded = {action.run_id for action in report.runs}
                for candidate in batch:
                    if candidate.run.run_id not in recorded:
                        report.record(_action(candidate, "skipped", error_reason(error)))
        budget -= len(acting)
        if rule.unreadable_are_found and findings.unreadable and budget > 0:
            try:
                await _repair_unreadable(
                    client, rule, findings.unreadable, parameters.dry_run, scope, budget, report
                )
            except Exception as error:  # the rule fails; what it did so far stays reported
                report.fail(error)
    for candidate in left:
        report.record(_action(candidate, "left", "max_actions reached in this pass"))
    return report


def _action(candidate: Candidate, outcome: str, reason: str | None = None) -> RunAction:
    run, verdict = candidate.run, candidate.verdict
    return RunAction(
        run_id=run.run_id,
        run_kind=candidate.run_kind,
        run_name=run.run_name,
        flow_name=run.flow_name,
        from_state=run.state_name if run.state_id else "Unknown",
        to_state="deleted" if verdict.target_type == DELETE else verdict.target_name,
        to_type=verdict.target_type,
        seen=verdict.seen,
        outcome=outcome,
        reason=reason,
    )


def _changed(
    rule: Rule, candidate: Candidate, current: dict[UUID, dict], unreadable: set[UUID]
) -> str | None:
    """Why the run may no longer be acted on, or None when it is as detection saw it."""
    run_id = candidate.run.run_id
    if run_id in unreadable:
        return None if rule.unreadable_are_found else "the run cannot be read through the API"
    if run_id not in current:
        return "the run no longer exists"
    if rule.unreadable_are_found:
        return "its state timestamp is set again"
    row = current[run_id]
    if row["state_id"] != (str(candidate.run.state_id) if candidate.run.state_id else None):
        return f"its state changed to {row['state_name'] or 'Unknown'} since detection"
    return None


async def _act_on_batch(
    client: PrefectClient, rule: Rule, batch: list[Candidate], dry_run: bool, report: RuleReport
) -> None:
    current, unreadable = await read_runs_by_id(
        client, rule.selection.run_kind, (candidate.run.run_id for candidate in batch)
    )
    changed = {candidate.run.run_id: _changed(rule, candidate, current, unreadable) for candidate in batch}
    # Runs this batch deletes: a parent whose subflows all go with it is not held back by them.
    deleting = [
        candidate.run.run_id
        for candidate in batch
        if candidate.verdict.target_type == DELETE and changed[candidate.run.run_id] is None
    ]
    ready = []
    for candidate in batch:
        reason = changed[candidate.run.run_id]
        if reason is None and candidate.verdict.target_type == DELETE:
            reason = await _why_not_delete(client, candidate.run.run_id, deleting)
        if reason is not None:
            report.record(_action(candidate, "skipped", reason))
        elif dry_run:
            report.record(_action(candidate, "would fix"))
        else:
            ready.append(candidate)
    limit = asyncio.Semaphore(get_settings().api_concurrency)

    async def apply(candidate: Candidate) -> RunAction:
        async with limit:
            try:
                reason = await _apply(client, rule, candidate)
            except Exception as error:  # one run's failure must not stop the others
                reason = error_reason(error)
        return _action(candidate, "skipped" if reason else "fixed", reason)

    actions: list[RunAction] = []
    for level in _deepest_first(ready):
        actions += await asyncio.gather(*(apply(candidate) for candidate in level))
    for action in actions:
        report.record(action)
    await _emit_reconciled(client, rule, [action for action in actions if action.outcome == "fixed"])


def error_reason(error: Exception) -> str:
    """Why a run or a limit was skipped: the error, redacted."""
    return f"error: {describe_error(error)}"


async def _why_not_delete(client: PrefectClient, run_id: UUID, deleting: list[UUID]) -> str | None:
    # Deleting a parent turns its subflows into top-level runs: leave trees to retention,
    # unless every subflow goes in the same batch (deepest first).
    flow_runs = {
        "parent_flow_run_id": {"any_": [str(run_id)]},
        "id": {"not_any_": [str(other) for other in deleting]},
    }
    subflows = await call(client, "POST", "/flow_runs/count", json={"flow_runs": flow_runs})
    return f"it has {subflows} subflow runs; delete it with the retention flow" if subflows else None


def _deepest_first(candidates: list[Candidate]) -> list[list[Candidate]]:
    """The candidates in rounds: a run comes after every subflow of it among them, so that
    no subflow is ever left behind as a top-level run."""
    waiting = {candidate.run.run_id: candidate for candidate in candidates}
    rounds = []
    while waiting:
        holders = {candidate.run.holder_id for candidate in waiting.values() if candidate.run.is_subflow}
        level = [candidate for run_id, candidate in waiting.items() if run_id not in holders]
        level = level or list(waiting.values())  # a cycle in corrupt data: all at once
        rounds.append(level)
        for candidate in level:
            del waiting[candidate.run.run_id]
    return rounds


async def _apply(client: PrefectClient, rule: Rule, candidate: Candidate) -> str | None:
    """Make the change; None when it was accepted, otherwise why not."""
    run_id, verdict = candidate.run.run_id, candidate.verdict
    if verdict.target_type == DELETE:
        try:
            await client.delete_flow_run(run_id)
        except ObjectNotFound:
            return "the run no longer exists"
        return None
    return await _set_state(client, rule, candidate.run_kind, run_id, verdict)


async def _set_state(
    client: PrefectClient, rule: Rule, run_kind: RunKind, run_id: UUID, verdict: Verdict
) -> str | None:
    state = State(
        type=StateType(verdict.target_type),
        name=verdict.target_name,
        message=state_message(rule, verdict.seen),
    )
    if run_kind == "flow_run":
        result = await client.set_flow_run_state(run_id, state, force=rule.force)
    else:
        result = await client.set_task_run_state(run_id, state, force=rule.force)
    if result.status == SetStateStatus.ACCEPT:
        return None
    detail = getattr(result.details, "reason", None) or "no reason given"
    return f"the API answered {result.status.value}: {detail}"


# What a run the API cannot read is seen as and given: its Running state, recorded again.
_UNREADABLE_VERDICT = Verdict(
    "RUNNING", STATE_NAMES["RUNNING"], "Running with no state timestamp; its Running state is recorded again"
)


def _unreadable_action(run_id: UUID, run_name: str, outcome: Outcome, reason: str | None = None) -> RunAction:
    return RunAction(
        run_id=run_id,
        run_kind="flow_run",
        run_name=run_name,
        from_state="Running",
        to_state=_UNREADABLE_VERDICT.target_name,
        to_type=_UNREADABLE_VERDICT.target_type,
        seen=_UNREADABLE_VERDICT.seen,
        outcome=outcome,
        reason=reason,
    )


async def _repair_unreadable(
    client: PrefectClient,
    rule: Rule,
    expected: int,
    dry_run: bool,
    scope: RunScope,
    budget: int,
    report: RuleReport,
) -> None:
    """Repair runs the API cannot list.

    Their ids cannot be read, but every other Running run can. From 3.6.16 one filter
    selects exactly them: "Running, started before this re-read, and none of the readable
    ones", and `bulk_set_state` answers with the id of every run it changed; in a dry run
    they are counted, without ids. Older servers, and scopes naming flows (a flow run
    filter cannot name flows), repair them one id at a time, the ids learnt from their
    events.
    """
    scoped_runs, scoped_flows = scope_filters(scope)
    flow_runs = {**scoped_runs, "state": {"type": {"any_": list(rule.selection.state_types or ())}}}
    reread_at = datetime.now(UTC)
    readable, still_unreadable = await read_every_row(
        client,
        "/flow_runs/filter",
        {"flow_runs": flow_runs, "flows": scoped_flows or None, "sort": "ID_DESC"},
    )
    report.skipped += max(0, expected - still_unreadable)
    if scope.flow_names or not await server_has(client, BULK_FLOW_RUN_ROUTES):
        why_no_filter = (
            "a filter cannot name flows (flow_names)"
            if scope.flow_names
            else f"this server has no bulk_set_state, which repairs them by a filter from Prefect "
            f"{'.'.join(map(str, BULK_FLOW_RUN_ROUTES))}"
        )
        readable_ids = [UUID(row["id"]) for row in readable]
        found = await find_unreadable_running_runs(client, flow_runs, scoped_flows, readable_ids)
        unreadable = min(expected, still_unreadable)
        await _repair_by_id(
            client, rule, found[:unreadable], unreadable, dry_run, budget, why_no_filter, report
        )
        return
    handled = min(still_unreadable, budget)
    report.left += min(expected, still_unreadable) - handled
    if dry_run:
        report.fixed += handled
        report.notes.append(f"{plural(handled, 'run')} would be repaired; their ids show once they are")
        return
    excluded = [row["id"] for row in readable]
    message = state_message(rule, _UNREADABLE_VERDICT.seen)
    repaired: list[RunAction] = []
    while len(repaired) < handled:
        answer = await call(
            client,
            "POST",
            "/flow_runs/bulk_set_state",
            json={
                "flow_runs": {
                    **flow_runs,
                    "id": {"not_any_": excluded},
                    "start_time": {"before_": reread_at.isoformat()},
                },
                "state": {"type": "RUNNING", "name": STATE_NAMES["RUNNING"], "message": message},
                "force": True,
                "limit": min(BULK_LIMIT, handled - len(repaired)),
            },
        )
        if not answer["results"]:
            break
        for result in answer["results"]:
            excluded.append(result["flow_run_id"])
            accepted = result["status"] == SetStateStatus.ACCEPT.value
            repaired.append(
                _unreadable_action(
                    result["flow_run_id"],
                    "(unreadable through the API)",
                    "fixed" if accepted else "skipped",
                    None if accepted else f"the API answered {result['status']}",
                )
            )
    report.skipped += handled - len(repaired)
    for action in repaired:
        report.record(action)
    await _emit_reconciled(client, rule, [action for action in repaired if action.outcome == "fixed"])


async def _repair_by_id(
    client: PrefectClient,
    rule: Rule,
    found: list[UnreadableRun],
    unreadable: int,
    dry_run: bool,
    budget: int,
    why_no_filter: str,
    report: RuleReport,
) -> None:
    """Repair each unreadable run whose id was learnt; the others are skipped, saying why."""
    missing = unreadable - len(found)
    if missing:
        report.skipped += missing
        report.notes.append(
            f"{missing} unreadable runs cannot be repaired through the API: their ids could not be "
            "learnt (no prefect.flow-run.Running event of theirs is left; events are kept for "
            f"PREFECT_EVENTS_RETENTION_PERIOD) and {why_no_filter}. Give the flow database access "
            "(MAINTENANCE_DATABASE_URL), which finds them by id"
        )
    acting, left = found[:budget], found[budget:]
    for run in left:
        report.record(
            _unreadable_action(run.run_id, run.run_name, "left", "max_actions reached in this pass")
        )
    if dry_run:
        for run in acting:
            report.record(_unreadable_action(run.run_id, run.run_name, "would fix"))
        return
    fixed = []
    for run in acting:
        try:
            reason = await _set_state(client, rule, "flow_run", run.run_id, _UNREADABLE_VERDICT)
        except Exception as error:  # one run's failure must not stop the others
            reason = error_reason(error)
        action = _unreadable_action(run.run_id, run.run_name, "skipped" if reason else "fixed", reason)
        report.record(action)
        if action.outcome == "fixed":
            fixed.append(action)
    await _emit_reconciled(client, rule, fixed)


async def _emit_reconciled(client: PrefectClient, rule: Rule, actions: list[RunAction]) -> None:
    await emit_maintenance_events(
        client,
        [
            maintenance_event(
                RECONCILED_EVENT,
                resource={
                    "prefect.resource.id": f"prefect.{action.run_kind.replace('_', '-')}.{action.run_id}",
                    "prefect.resource.name": action.run_name,
                },
                rule=rule,
                payload={
                    "rule": rule.name,
                    "from_state": action.from_state,
                    "to_state": action.to_state,
                    "seen": action.seen,
                },
            )
            for action in actions
        ],
    )


def maintenance_event(
    event: str, resource: dict, rule: Rule, payload: dict, related: list[dict] | None = None
) -> dict:
    """One event about what a reconcile rule did, related to the rule, so that users can
    hang automations and notifications on it."""
    return {
        "id": str(uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": event,
        "resource": resource,
        "related": [
            *(related or ()),
            {
                "prefect.resource.id": f"prefect-maintenance.rule.{rule.name}",
                "prefect.resource.role": "reconcile-rule",
                "prefect.resource.name": rule.title,
            },
        ],
        "payload": payload,
    }


async def emit_maintenance_events(client: PrefectClient, events: list[dict]) -> None:
    if events:
        await call(client, "POST", "/events", json=events)
