"""Finding stuck runs, read-only: by SQL when the database is reachable, by the API otherwise.

Both paths turn runs into `Snapshot`s and hand them to the rule's judge, so a rule finds
the same runs either way. The SQL path is one indexed query per rule (state type,
`state_id`, `state_timestamp` and heartbeat indexes) and never writes. The API path
reads flow runs in pages; a Running run with a NULL `state_timestamp` makes every page
holding it answer 500, so a failing page is read again in halves and the rows that fail
alone are counted as unreadable instead of stopping detection.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import PrefectClient
from prefect.exceptions import ObjectNotFound
from sqlalchemy import text

from tasks.database import connect, dialect_of, is_reachable
from tasks.prefect_api import (
    PAGE_SIZE,
    RunKind,
    api_time,
    api_uuid,
    call,
    chunks,
    flow_names_by_id,
    prefect_client,
    read_every_row,
    read_runs_in_chunks,
)
from tasks.reconcile.heartbeats import LATEST_HEARTBEAT_SQL, latest_heartbeats
from tasks.reconcile.parameters import ReconcileParameters
from tasks.reconcile.rules import TERMINAL_STATES, Judging, Rule, Selection, Snapshot, Verdict
from tasks.settings import describe_database_url, get_settings


@dataclass(frozen=True)
class DetectionSource:
    kind: Literal["sql", "api"]
    note: str


@dataclass(frozen=True)
class RunScope:
    """The include filters, with deployment names resolved to ids; empty means every run."""

    deployment_ids: tuple[UUID, ...] = ()
    flow_names: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    work_queue_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Candidate:
    run_kind: RunKind
    run: Snapshot
    verdict: Verdict


@dataclass
class Findings:
    candidates: list[Candidate] = field(default_factory=list)
    # Runs the API cannot show: counted, but their ids are unknown until they are repaired.
    unreadable: int = 0

    def found_by(self, rule: Rule) -> int:
        """The runs the rule found: its candidates, and the unreadable ones it exists for."""
        return len(self.candidates) + (self.unreadable if rule.unreadable_are_found else 0)

    def ending(self) -> dict[UUID, str]:
        """The flow runs these findings would end, with the state type they end in."""
        return {
            candidate.run.run_id: candidate.verdict.target_type
            for candidate in self.candidates
            if candidate.run_kind == "flow_run"
        }


@task(name="choose-detection-source", cache_policy=NO_CACHE)
async def choose_detection_source() -> DetectionSource:
    url = get_settings().database_url
    if url is None:
        return DetectionSource("api", "no database configured: runs were found through the Prefect API")
    described = describe_database_url(url)
    if dialect_of(url) != "postgresql":
        return DetectionSource("api", f"{described}: runs were found through the Prefect API")
    if not await is_reachable(url):
        return DetectionSource(
            "api", f"the {described} is not reachable: runs were found through the Prefect API"
        )
    return DetectionSource("sql", f"read-only queries on the {described}")


@task(name="resolve-scope", cache_policy=NO_CACHE)
async def resolve_scope(parameters: ReconcileParameters) -> RunScope:
    """Deployment names to ids; an unknown deployment or flow name (a typo would otherwise
    quietly match nothing) fails here, before anything is touched."""
    deployment_ids = []
    async with prefect_client() as client:
        if parameters.flow_names:
            body = {"flows": {"name": {"any_": list(parameters.flow_names)}}}
            known = {row["name"] for row in await call(client, "POST", "/flows/filter", json=body)}
            missing = [name for name in parameters.flow_names if name not in known]
            if missing:
                raise ValueError(f"flow_names: no flow is named {', '.join(map(repr, missing))}")
        for name in parameters.deployment_names:
            try:
                deployment_ids.append((await client.read_deployment_by_name(name)).id)
            except (ObjectNotFound, ValueError):  # ValueError: not of the form flow/deployment
                raise ValueError(
                    f"deployment_names: no deployment is named {name!r} "
                    "(the form is 'flow-name/deployment-name')"
                ) from None
    return RunScope(
        deployment_ids=tuple(deployment_ids),
        flow_names=parameters.flow_names,
        tags=parameters.tags,
        work_queue_names=parameters.work_queue_names,
    )


@task(name="find-stuck-runs", task_run_name="find-{rule.name}", cache_policy=NO_CACHE)
async def find_stuck_runs(
    rule: Rule,
    parameters: ReconcileParameters,
    scope: RunScope,
    source: DetectionSource,
    ending: Mapping[UUID, str],
) -> Findings:
    """The runs `rule` would act on, oldest first; runs this pass already ends are left out."""
    now = datetime.now(UTC)
    threshold = parameters.threshold(rule.threshold) if rule.threshold else None
    judging = Judging(parameters, now, now - threshold if threshold else None, ending)
    if source.kind == "sql":
        snapshots, unreadable = await _snapshots_from_database(rule.selection, scope, judging), 0
    else:
        snapshots, unreadable = await _snapshots_from_api(rule.selection, scope, judging)
    findings = Findings(unreadable=unreadable)
    for run in snapshots:
        if run.run_id in ending:
            continue
        verdict = rule.judge(run, judging)
        if verdict is not None:
            findings.candidates.append(Candidate(rule.selection.run_kind, run, verdict))
    findings.candidates.sort(key=lambda candidate: _age_key(candidate.run))
    return findings


def _age_key(run: Snapshot) -> tuple[float, str]:
    moment = run.state_timestamp or run.start_time or run.next_scheduled_start_time
    return (moment.timestamp() if moment else 0.0, str(run.run_id))


# ---------------------------------------------------------------- by SQL (PostgreSQL)

_FLOW_RUNS_SQL = """
SELECT run.id AS run_id, run.name AS run_name, flow.name AS flow_name,
       run.state_id, CAST(run.state_type AS text) AS state_type, run.state_name,
       run.state_timestamp, run.start_time, run.next_scheduled_start_time,
       {heartbeat} AS latest_heartbeat,
       run.parent_task_run_id IS NOT NULL AS is_subflow,
       holder.id AS holder_id, CAST(holder.state_type AS text) AS holder_state_type,
       holder.state_timestamp AS holder_state_timestamp,
       run.parent_task_run_id IS NULL OR holder.id IS NOT NULL AS holder_exists,
       NULL AS subflow_id, NULL AS subflow_state_type
FROM flow_run AS run
JOIN flow ON flow.id = run.flow_id
LEFT JOIN task_run AS parent_task ON parent_task.id = run.parent_task_run_id
LEFT JOIN flow_run AS holder ON holder.id = parent_task.flow_run_id
WHERE {conditions}
"""

_TASK_RUNS_SQL = """
SELECT run.id AS run_id, run.name AS run_name, flow.name AS flow_name,
       run.state_id, CAST(run.state_type AS text) AS state_type, run.state_name,
       run.state_timestamp, run.start_time, run.next_scheduled_start_time,
       NULL AS latest_heartbeat, FALSE AS is_subflow,
       holder.id AS holder_id, CAST(holder.state_type AS text) AS holder_state_type,
       holder.state_timestamp AS holder_state_timestamp, TRUE AS holder_exists,
       subflow.id AS subflow_id, CAST(subflow.state_type AS text) AS subflow_state_type
FROM task_run AS run
JOIN flow_run AS holder ON holder.id = run.flow_run_id
JOIN flow ON flow.id = holder.flow_id
LEFT JOIN LATERAL (
    SELECT id, state_type FROM flow_run WHERE flow_run.parent_task_run_id = run.id LIMIT 1
) AS subflow ON TRUE
WHERE {conditions}
"""


def _scope_sql(scope: RunScope, flow_run: str) -> tuple[list[str], dict[str, Any]]:
    conditions: list[str] = []
    values: dict[str, Any] = {}
    if scope.flow_names:
        conditions.append("flow.name = ANY(CAST(:flow_names AS text[]))")
        values["flow_names"] = list(scope.flow_names)
    if scope.deployment_ids:
        conditions.append(f"{flow_run}.deployment_id = ANY(CAST(:deployment_ids AS uuid[]))")
        values["deployment_ids"] = list(scope.deployment_ids)
    if scope.tags:
        conditions.append(f"jsonb_exists_any(CAST({flow_run}.tags AS jsonb), CAST(:tags AS text[]))")
        values["tags"] = list(scope.tags)
    if scope.work_queue_names:
        conditions.append(f"{flow_run}.work_queue_name = ANY(CAST(:work_queue_names AS text[]))")
        values["work_queue_names"] = list(scope.work_queue_names)
    return conditions, values


async def _snapshots_from_database(selection: Selection, scope: RunScope, judging: Judging) -> list[Snapshot]:
    is_task_run = selection.run_kind == "task_run"
    conditions, values = _scope_sql(scope, "holder" if is_task_run else "run")
    if selection.state_types:
        listed = ", ".join(f"'{state}'" for state in selection.state_types)
        conditions.append(f"run.state_type IN ({listed})")
    conditions.append(selection.sql_condition)
    template = _TASK_RUNS_SQL if is_task_run else _FLOW_RUNS_SQL
    statement = template.format(
        heartbeat=LATEST_HEARTBEAT_SQL if selection.heartbeats else "NULL",
        conditions=" AND ".join(conditions),
    )
    if ":cutoff" in statement:
        values["cutoff"] = judging.cutoff
    if ":ending_ids" in statement:
        values["ending_ids"] = list(judging.ending)
    async with connect(read_only=True) as connection:
        rows = (await connection.execute(text(statement), values)).mappings().all()
    return [Snapshot(**row) for row in rows]


# ---------------------------------------------------------------- through the API


def scope_filters(scope: RunScope) -> tuple[dict[str, Any], dict[str, Any]]:
    """(flow run filter, flow filter) for the include filters."""
    flow_runs: dict[str, Any] = {}
    if scope.deployment_ids:
        flow_runs["deployment_id"] = {"any_": [str(deployment_id) for deployment_id in scope.deployment_ids]}
    if scope.tags:
        flow_runs["tags"] = {"any_": list(scope.tags)}
    if scope.work_queue_names:
        flow_runs["work_queue_name"] = {"any_": list(scope.work_queue_names)}
    flows = {"name": {"any_": list(scope.flow_names)}} if scope.flow_names else {}
    return flow_runs, flows


async def _snapshots_from_api(
    selection: Selection, scope: RunScope, judging: Judging
) -> tuple[list[Snapshot], int]:
    scoped_runs, scoped_flows = scope_filters(scope)
    async with prefect_client() as client:
        if selection.run_kind == "task_run":
            return await _task_run_snapshots(client, selection, scoped_runs, scoped_flows, judging), 0
        flow_runs = {**scoped_runs, **selection.api_filter}
        if selection.state_types:
            flow_runs["state"] = {"type": {"any_": list(selection.state_types)}}
        if selection.api_before and judging.cutoff:
            flow_runs[selection.api_before] = {"before_": judging.cutoff.isoformat()}
        body = {"flow_runs": flow_runs, "flows": scoped_flows or None, "sort": "ID_DESC"}
        rows, unreadable = await read_every_row(client, "/flow_runs/filter", body)
        return await _flow_run_snapshots(client, rows, selection.heartbeats), unreadable


async def _flow_run_snapshots(client: PrefectClient, rows: list[dict], heartbeats: bool) -> list[Snapshot]:
    if not rows:
        return []
    flow_names = await flow_names_by_id(client, (row["flow_id"] for row in rows))
    latest: dict[UUID, datetime] = {}
    if heartbeats:
        earliest = min(datetime.fromisoformat(row["created"]) for row in rows)
        latest = await latest_heartbeats(client, (UUID(row["id"]) for row in rows), earliest)
    holders = await _subflow_holders(
        client, [row["parent_task_run_id"] for row in rows if row["parent_task_run_id"]]
    )
    snapshots = []
    for row in rows:
        run_id = UUID(row["id"])
        holder = holders.get(row["parent_task_run_id"]) if row["parent_task_run_id"] else None
        snapshots.append(
            Snapshot(
                run_id=run_id,
                run_name=row["name"],
                flow_name=flow_names.get(row["flow_id"]),
                state_id=api_uuid(row["state_id"]),
                state_type=row["state_type"],
                state_name=row["state_name"],
                state_timestamp=api_time((row.get("state") or {}).get("timestamp")),
                start_time=api_time(row["start_time"]),
                next_scheduled_start_time=api_time(row["next_scheduled_start_time"]),
                latest_heartbeat=latest.get(run_id),
                is_subflow=row["parent_task_run_id"] is not None,
                holder_id=holder["id"] if holder else None,
                holder_state_type=holder["state_type"] if holder else None,
                holder_state_timestamp=holder["state_timestamp"] if holder else None,
                holder_exists=holder is not None or not row["parent_task_run_id"],
            )
        )
    return snapshots


async def _holder_states(client: PrefectClient, flow_run_ids: Iterable[UUID]) -> dict[UUID, dict[str, Any]]:
    """Flow run id -> its flow, state type and timestamp; unreadable ones are Running (that
    is what makes them unreadable) with an unknown timestamp; deleted ones are missing."""
    rows, unreadable = await read_runs_in_chunks(client, "flow_run", flow_run_ids)
    states = {
        run_id: {
            "id": run_id,
            "flow_id": row["flow_id"],
            "state_type": row["state_type"],
            "state_timestamp": api_time((row.get("state") or {}).get("timestamp")),
        }
        for run_id, row in rows.items()
    }
    states |= {
        run_id: {"id": run_id, "flow_id": None, "state_type": "RUNNING", "state_timestamp": None}
        for run_id in unreadable
    }
    return states


async def _subflow_holders(
    client: PrefectClient, parent_task_run_ids: list[str]
) -> dict[str, dict[str, Any]]:
    """Parent task run id -> the parent flow run's state, for the parents that still exist."""
    if not parent_task_run_ids:
        return {}
    task_rows, _ = await read_runs_in_chunks(
        client, "task_run", (UUID(task_id) for task_id in parent_task_run_ids)
    )
    holder_ids = {str(task_id): UUID(row["flow_run_id"]) for task_id, row in task_rows.items()}
    states = await _holder_states(client, holder_ids.values())
    return {
        task_id: states[flow_run_id] for task_id, flow_run_id in holder_ids.items() if flow_run_id in states
    }


async def _task_run_snapshots(
    client: PrefectClient,
    selection: Selection,
    scoped_runs: dict[str, Any],
    scoped_flows: dict[str, Any],
    judging: Judging,
) -> list[Snapshot]:
    """Task runs in the selected states whose flow run ended, or ends in this pass."""
    task_runs = {"state": {"type": {"any_": list(selection.state_types or ())}}}
    holder_filters = [{**scoped_runs, "state": {"type": {"any_": list(TERMINAL_STATES)}}}]
    if judging.ending:
        holder_filters.append({**scoped_runs, "id": {"any_": [str(run_id) for run_id in judging.ending]}})
    rows: dict[str, dict] = {}
    for flow_runs in holder_filters:
        body = {
            "task_runs": task_runs,
            "flow_runs": flow_runs,
            "flows": scoped_flows or None,
            "sort": "ID_DESC",
        }
        found, _ = await read_every_row(client, "/task_runs/filter", body)
        rows |= {row["id"]: row for row in found}
    if not rows:
        return []
    holders = await _holder_states(client, {UUID(row["flow_run_id"]) for row in rows.values()})
    subflows = await _subflows_of(client, list(rows))
    flow_names = await flow_names_by_id(
        client, (holder["flow_id"] for holder in holders.values() if holder["flow_id"])
    )
    snapshots = []
    for row in rows.values():
        holder_id = UUID(row["flow_run_id"])
        holder = holders.get(holder_id, {})
        snapshots.append(
            Snapshot(
                run_id=UUID(row["id"]),
                run_name=row["name"],
                flow_name=flow_names.get(holder.get("flow_id") or ""),
                state_id=api_uuid(row["state_id"]),
                state_type=row["state_type"],
                state_name=row["state_name"],
                state_timestamp=api_time((row.get("state") or {}).get("timestamp")),
                start_time=api_time(row["start_time"]),
                holder_id=holder_id,
                holder_state_type=holder.get("state_type"),
                holder_state_timestamp=holder.get("state_timestamp"),
                subflow_id=subflows.get(row["id"], {}).get("id"),
                subflow_state_type=subflows.get(row["id"], {}).get("state_type"),
            )
        )
    return snapshots


async def _subflows_of(client: PrefectClient, task_run_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Task run id -> the subflow it stands for (id and state type), for those that have one."""
    subflows: dict[str, dict[str, Any]] = {}
    for chunk in chunks(task_run_ids, PAGE_SIZE):
        body = {"flow_runs": {"parent_task_run_id": {"any_": chunk}}}
        rows, _ = await read_every_row(client, "/flow_runs/filter", {**body, "sort": "ID_DESC"})
        subflows |= {
            row["parent_task_run_id"]: {"id": UUID(row["id"]), "state_type": row["state_type"]}
            for row in rows
        }
    return subflows
