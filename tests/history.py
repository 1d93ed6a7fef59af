"""Arranging run histories for the reliability suite, and the invariants checked after each fault.

Runs are created through the Prefect API (flows, deployments, runs with their states,
task runs for subflow links, logs, artifacts); only their clocks are then moved back with
SQL, and a missing current state or end time is made the way a crash makes it. Every
history uses flow names of its own, so a test can scope the flows to it on a shared server.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa

from tasks.database import connect
from tasks.prefect_api import call, prefect_client

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
NON_TERMINAL = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")
LOGS_PER_RUN = 2


@dataclass
class PlannedRun:
    """One flow run to create: its state, age, place in a tree, and what it carries."""

    state_type: str
    days_old: float
    parent: int | None = None
    tags: tuple[str, ...] = ()
    deployment: bool = False
    without_end_time: bool = False
    unknown_state: bool = False
    artifact_key: str | None = None


@dataclass
class History:
    """What was created: run ids in plan order, each run's plan, trees by root."""

    flow_names: list[str]
    ids: list[uuid.UUID] = field(default_factory=list)
    plans: dict[uuid.UUID, PlannedRun] = field(default_factory=dict)
    parent_of: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)

    def root_of(self, run_id: uuid.UUID) -> uuid.UUID:
        while run_id in self.parent_of:
            run_id = self.parent_of[run_id]
        return run_id

    def trees(self) -> dict[uuid.UUID, set[uuid.UUID]]:
        trees: dict[uuid.UUID, set[uuid.UUID]] = {}
        for run_id in self.ids:
            trees.setdefault(self.root_of(run_id), set()).add(run_id)
        return trees

    def non_terminal(self) -> set[uuid.UUID]:
        """Runs that are not known to be finished: non-terminal states and runs without a state."""
        return {
            run_id
            for run_id, plan in self.plans.items()
            if plan.state_type in NON_TERMINAL or plan.unknown_state
        }


async def create_history(prefix: str, plans: list[PlannedRun]) -> History:
    """Create `plans` (a parent always comes before its subflows) and arrange their clocks."""
    flow_names = [f"{prefix}-parent", f"{prefix}-child"]
    history = History(flow_names=flow_names)
    async with prefect_client() as client:
        flow_ids = [(await call(client, "POST", "/flows/", json={"name": name}))["id"] for name in flow_names]
        deployment = await call(
            client,
            "POST",
            "/deployments/",
            json={"name": f"{prefix}-deployment", "flow_id": flow_ids[0], "paused": True},
        )
        for index, plan in enumerate(plans):
            body = {
                "flow_id": flow_ids[0] if plan.parent is None else flow_ids[1],
                "name": f"{prefix}-run-{index}",
                "tags": list(plan.tags),
                "state": {"type": plan.state_type, "name": plan.state_type.title()},
            }
            if plan.deployment and plan.parent is None:
                body["deployment_id"] = deployment["id"]
            if plan.parent is not None:
                parent_id = history.ids[plan.parent]
                task_run = await call(
                    client,
                    "POST",
                    "/task_runs/",
                    json={
                        "flow_run_id": str(parent_id),
                        "task_key": f"{prefix}-subflow",
                        "dynamic_key": str(index),
                        "name": f"{prefix}-subflow-{index}",
                        "state": {"type": "RUNNING", "name": "Running"},
                    },
                )
                body["parent_task_run_id"] = task_run["id"]
            run_id = uuid.UUID((await call(client, "POST", "/flow_runs/", json=body))["id"])
            history.ids.append(run_id)
            history.plans[run_id] = plan
            if plan.parent is not None:
                history.parent_of[run_id] = history.ids[plan.parent]
            if plan.artifact_key is not None:
                await call(
                    client,
                    "POST",
                    "/artifacts/",
                    json={
                        "key": plan.artifact_key,
                        "type": "markdown",
                        "data": "#",
                        "flow_run_id": str(run_id),
                    },
                )
        now = datetime.now(UTC).isoformat()
        await call(
            client,
            "POST",
            "/logs/",
            json=[
                {
                    "name": "history",
                    "level": 20,
                    "message": "line",
                    "timestamp": now,
                    "flow_run_id": str(run_id),
                }
                for run_id in history.ids
                for _ in range(LOGS_PER_RUN)
            ],
        )
    await _arrange_clocks(history)
    return history


async def _arrange_clocks(history: History) -> None:
    shift = "make_interval(secs => :seconds)"
    async with connect() as connection:
        for run_id, plan in history.plans.items():
            values = {"id": run_id, "seconds": plan.days_old * 86_400}
            await connection.execute(
                sa.text(
                    f"UPDATE flow_run SET created = created - {shift}, "
                    f"expected_start_time = expected_start_time - {shift}, start_time = start_time - {shift}, "
                    f"state_timestamp = state_timestamp - {shift}, "
                    f"end_time = CASE WHEN :drop_end THEN NULL ELSE end_time - {shift} END WHERE id = :id"
                ),
                {**values, "drop_end": plan.without_end_time},
            )
            await connection.execute(
                sa.text(f"UPDATE flow_run_state SET timestamp = timestamp - {shift} WHERE flow_run_id = :id"),
                values,
            )
            if plan.unknown_state:
                # What a crash mid-write leaves: the current state row is gone, state_id is NULL.
                await connection.execute(
                    sa.text(
                        "DELETE FROM flow_run_state WHERE id = (SELECT state_id FROM flow_run WHERE id = :id)"
                    ),
                    {"id": run_id},
                )
        await connection.commit()


async def old_finished_runs(prefix: str, count: int, *, days: float = 90, artifacts: bool = True) -> History:
    """`count` top-level Completed runs `days` old, with logs and (keyed) artifacts."""
    plans = [
        PlannedRun("COMPLETED", days, artifact_key=f"{prefix}-report" if artifacts else None)
        for _ in range(count)
    ]
    return await create_history(prefix, plans)


# Checks ---------------------------------------------------------------------------------


async def rows(sql: str, **values) -> list[sa.Row]:
    async with connect() as connection:
        return list(await connection.execute(sa.text(sql), values))


async def scalar(sql: str, **values):
    return (await rows(sql, **values))[0][0]


async def existing(run_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
    found = await rows("SELECT id FROM flow_run WHERE id = ANY(:ids)", ids=list(run_ids))
    return {row.id for row in found}


async def owned_rows(run_ids: Iterable[uuid.UUID]) -> dict[str, int]:
    """Rows that belong to these flow runs, per table: zero everywhere once the runs are gone."""
    ids = list(run_ids)
    counts = {}
    for table in ("flow_run_state", "task_run", "log", "artifact"):
        counts[table] = await scalar(f"SELECT count(*) FROM {table} WHERE flow_run_id = ANY(:ids)", ids=ids)
    return counts


async def split_trees(history: History) -> set[uuid.UUID]:
    """Surviving subflows that lost their parent: turned into fake top-level runs."""
    subflows = list(history.parent_of)
    found = await rows(
        "SELECT child.id FROM flow_run child "
        "LEFT JOIN task_run link ON link.id = child.parent_task_run_id "
        "LEFT JOIN flow_run parent ON parent.id = link.flow_run_id "
        "WHERE child.id = ANY(:ids) AND parent.id IS NULL",
        ids=subflows,
    )
    return {row.id for row in found}


async def dangling_collections(keys: Iterable[str]) -> int:
    """Artifact collections of these keys whose latest artifact is gone."""
    return await scalar(
        "SELECT count(*) FROM artifact_collection c WHERE c.key = ANY(:keys) "
        "AND NOT EXISTS (SELECT 1 FROM artifact a WHERE a.id = c.latest_id)",
        keys=list(keys),
    )


async def wait_for(condition, *, what: str, attempts: int = 600, pause: float = 0.05):
    """Poll `condition()` (async) until it returns something truthy; bounded in attempts."""
    for _ in range(attempts):
        value = await condition()
        if value:
            return value
        await asyncio.sleep(pause)
    raise AssertionError(f"gave up waiting for {what}")


async def session_waiting_for_a_lock(
    watcher, *, application_name: str | None = None, exclude: set[int] = frozenset()
) -> int | None:
    """The pid of a session of this database waiting on a lock (optionally: of one application),
    other than the `exclude`d ones (a terminated backend stays listed for a moment)."""
    condition = "AND application_name = :application_name" if application_name else ""
    return (
        await watcher.execute(
            sa.text(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                f"AND datname = current_database() AND pid <> pg_backend_pid() {condition} "
                "AND NOT (pid = ANY(:exclude)) LIMIT 1"
            ),
            {
                "exclude": sorted(exclude),
                **({"application_name": application_name} if application_name else {}),
            },
        )
    ).scalar()
