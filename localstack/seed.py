"""Seed a messy Prefect history: the situations the maintenance flows exist for.

Everything is created through the Prefect API (flows, deployments, runs, states, task
runs, logs, artifacts, heartbeat events). Prefect stamps every state "now", so a little
SQL then moves clocks back and breaks what only a crash can break (a deleted current
state, a NULL `state_timestamp`). That SQL is for seeding demo and test databases only.

    python -m localstack.seed            # against PREFECT_API_URL + MAINTENANCE_DATABASE_URL
    python -m localstack.seed --prefix b --json history.json   # the ids seeded, by category
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, text

from tasks.database import connect, dialect_of
from tasks.prefect_api import TERMINAL_STATES, call, prefect_client

log = logging.getLogger("localstack.seed")

STATE_NAMES = {
    "SCHEDULED": "Scheduled",
    "PENDING": "Pending",
    "RUNNING": "Running",
    "COMPLETED": "Completed",
    "FAILED": "Failed",
    "CANCELLED": "Cancelled",
    "CRASHED": "Crashed",
    "CANCELLING": "Cancelling",
    "PAUSED": "Paused",
}
HOUR = 3600.0
DAY = 24 * HOUR


@dataclasses.dataclass
class MessyHistory:
    """The ids of what was seeded, by category (flow run ids unless the name says task run)."""

    prefix: str
    deployments: dict[str, uuid.UUID] = dataclasses.field(default_factory=dict)
    flow_names: list[str] = dataclasses.field(default_factory=list)
    tags: list[str] = dataclasses.field(default_factory=list)
    old_finished: list[uuid.UUID] = dataclasses.field(default_factory=list)
    old_finished_by_state: dict[str, list[uuid.UUID]] = dataclasses.field(default_factory=dict)
    # The old finished runs of each deployment ("flow/deployment"), newest first.
    old_finished_by_deployment: dict[str, list[uuid.UUID]] = dataclasses.field(default_factory=dict)
    # The old finished run tagged "<prefix>-keep": the newest of the first deployment.
    keep_tagged: uuid.UUID | None = None
    # The old finished tree without a deployment: parent, subflow, sub-subflow.
    old_tree: list[uuid.UUID] = dataclasses.field(default_factory=list)
    old_subflows: list[uuid.UUID] = dataclasses.field(default_factory=list)
    recent_finished: list[uuid.UUID] = dataclasses.field(default_factory=list)
    unknown_state: list[uuid.UUID] = dataclasses.field(default_factory=list)
    cancelled_parent: uuid.UUID | None = None
    cancelling_subflows: list[uuid.UUID] = dataclasses.field(default_factory=list)
    fresh_cancelling: list[uuid.UUID] = dataclasses.field(default_factory=list)
    stuck_pending: list[uuid.UUID] = dataclasses.field(default_factory=list)
    fresh_pending: list[uuid.UUID] = dataclasses.field(default_factory=list)
    zombie_running: list[uuid.UUID] = dataclasses.field(default_factory=list)
    healthy_running: list[uuid.UUID] = dataclasses.field(default_factory=list)
    running_without_heartbeat: list[uuid.UUID] = dataclasses.field(default_factory=list)
    late: list[uuid.UUID] = dataclasses.field(default_factory=list)
    scheduled_tomorrow: list[uuid.UUID] = dataclasses.field(default_factory=list)
    null_state_timestamp: list[uuid.UUID] = dataclasses.field(default_factory=list)
    terminal_without_end_time: list[uuid.UUID] = dataclasses.field(default_factory=list)
    terminal_without_end_time_by_state: dict[str, list[uuid.UUID]] = dataclasses.field(default_factory=dict)
    old_finished_parent: uuid.UUID | None = None
    running_subflow_under_finished_parent: list[uuid.UUID] = dataclasses.field(default_factory=list)
    open_task_runs_in_finished_flow: list[uuid.UUID] = dataclasses.field(default_factory=list)
    keyed_artifact_keys: list[str] = dataclasses.field(default_factory=list)
    # The runs whose artifact has each key.
    runs_by_artifact_key: dict[str, list[uuid.UUID]] = dataclasses.field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """How many runs each category holds, for a summary."""
        result = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list) and field.name not in ("flow_names", "tags", "keyed_artifact_keys"):
                result[field.name] = len(value)
            elif isinstance(value, uuid.UUID):
                result[field.name] = 1
        return result

    def flow_runs(self) -> set[uuid.UUID]:
        """Every flow run seeded."""
        seeded = set()
        for name in self.counts():
            if name != "open_task_runs_in_finished_flow":  # task runs
                value = getattr(self, name)
                seeded |= set(value) if isinstance(value, list) else {value}
        return seeded

    def expired_by_default(self) -> set[uuid.UUID]:
        """What retention's default policy deletes: the old finished runs, and the old terminal
        runs without an end time (aged by their state time)."""
        return set(self.old_finished) | set(self.terminal_without_end_time)


class _Seeder:
    def __init__(self, client, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.shifts: list[tuple[uuid.UUID, float]] = []
        self.flow_ids: dict[str, uuid.UUID] = {}
        self.counter = 0

    async def flow(self, name: str) -> uuid.UUID:
        if name not in self.flow_ids:
            row = await call(self.client, "POST", "/flows/", json={"name": name})
            self.flow_ids[name] = uuid.UUID(row["id"])
        return self.flow_ids[name]

    async def deployment(self, flow_name: str, name: str, tags: list[str]) -> uuid.UUID:
        flow_id = await self.flow(flow_name)
        row = await call(
            self.client,
            "POST",
            "/deployments/",
            json={"name": name, "flow_id": str(flow_id), "tags": tags, "paused": True},
        )
        return uuid.UUID(row["id"])

    async def flow_run(
        self,
        flow_name: str,
        states: Iterable[str],
        *,
        deployment_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        parent_task_run_id: uuid.UUID | None = None,
        scheduled_for: datetime | None = None,
        scheduled_name: str = "Scheduled",
    ) -> uuid.UUID:
        self.counter += 1
        flow_id = await self.flow(flow_name)
        scheduled: dict[str, Any] = {"type": "SCHEDULED", "name": scheduled_name}
        if scheduled_for is not None:
            scheduled["state_details"] = {"scheduled_time": scheduled_for.isoformat()}
        body: dict[str, Any] = {
            "flow_id": str(flow_id),
            "name": f"{self.prefix}-run-{self.counter}",
            "tags": tags or [],
            "state": scheduled,
        }
        if deployment_id is not None:
            body["deployment_id"] = str(deployment_id)
        if parent_task_run_id is not None:
            body["parent_task_run_id"] = str(parent_task_run_id)
        row = await call(self.client, "POST", "/flow_runs/", json=body)
        run_id = uuid.UUID(row["id"])
        for state in states:
            await self.set_flow_run_state(run_id, state)
        return run_id

    async def set_flow_run_state(self, run_id: uuid.UUID, state_type: str, name: str | None = None) -> None:
        await call(
            self.client,
            "POST",
            f"/flow_runs/{run_id}/set_state",
            json={"state": {"type": state_type, "name": name or STATE_NAMES[state_type]}, "force": True},
        )

    async def task_run(
        self, flow_run_id: uuid.UUID, states: Iterable[str], *, cache_key: str | None = None
    ) -> uuid.UUID:
        self.counter += 1
        row = await call(
            self.client,
            "POST",
            "/task_runs/",
            json={
                "flow_run_id": str(flow_run_id),
                "task_key": f"{self.prefix}-task",
                "dynamic_key": str(self.counter),
                "name": f"{self.prefix}-task-{self.counter}",
                "state": {"type": "PENDING", "name": "Pending"},
            },
        )
        task_run_id = uuid.UUID(row["id"])
        for state in states:
            details: dict[str, Any] = {}
            if cache_key and state == "COMPLETED":
                details = {"cache_key": cache_key}
            await call(
                self.client,
                "POST",
                f"/task_runs/{task_run_id}/set_state",
                # Not forced: Prefect's cache rule records the cache row only on a normal
                # transition.
                json={
                    "state": {"type": state, "name": STATE_NAMES[state], "state_details": details},
                    "force": cache_key is None,
                },
            )
        return task_run_id

    async def logs(self, flow_run_id: uuid.UUID, task_run_id: uuid.UUID | None, count: int) -> None:
        now = datetime.now(UTC).isoformat()
        await call(
            self.client,
            "POST",
            "/logs/",
            json=[
                {
                    "name": "prefect.flow_runs",
                    "level": 20,
                    "message": f"seeded log line {index} of {flow_run_id}",
                    "timestamp": now,
                    "flow_run_id": str(flow_run_id),
                    "task_run_id": str(task_run_id) if task_run_id else None,
                }
                for index in range(count)
            ],
        )

    async def artifact(self, flow_run_id: uuid.UUID, key: str | None) -> None:
        await call(
            self.client,
            "POST",
            "/artifacts/",
            json={
                "key": key,
                "type": "markdown",
                "data": f"# report of {flow_run_id}",
                "flow_run_id": str(flow_run_id),
            },
        )

    async def heartbeat(self, flow_run_id: uuid.UUID, occurred: datetime) -> None:
        await call(
            self.client,
            "POST",
            "/events",
            json=[
                {
                    "id": str(uuid.uuid4()),
                    "occurred": occurred.isoformat(),
                    "event": "prefect.flow-run.heartbeat",
                    "resource": {
                        "prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
                        "prefect.resource.name": f"{self.prefix}-heartbeat",
                    },
                    "related": [],
                    "payload": {},
                }
            ],
        )

    def age(self, run_ids: Iterable[uuid.UUID], seconds: float) -> None:
        """Remember to move these runs' clocks `seconds` into the past."""
        self.shifts.extend((run_id, seconds) for run_id in run_ids)


# Columns moved back in time, by table, and how each table finds its flow run.
_CLOCK_COLUMNS = {
    "flow_run": (
        (
            "created",
            "expected_start_time",
            "next_scheduled_start_time",
            "start_time",
            "end_time",
            "state_timestamp",
        ),
        "id IN :ids",
    ),
    "flow_run_state": (("timestamp", "created"), "flow_run_id IN :ids"),
    "task_run": (
        ("created", "expected_start_time", "start_time", "end_time", "state_timestamp"),
        "flow_run_id IN :ids",
    ),
    "task_run_state": (
        ("timestamp", "created"),
        "task_run_id IN (SELECT id FROM task_run WHERE flow_run_id IN :ids)",
    ),
    "log": (("timestamp", "created"), "flow_run_id IN :ids"),
    "artifact": (("created",), "flow_run_id IN :ids"),
}


def _shifted(dialect: str, column: str) -> str:
    if dialect == "sqlite":
        return f"strftime('%Y-%m-%d %H:%M:%f', {column}, '-' || :seconds || ' seconds')"
    return f"{column} - make_interval(secs => :seconds)"


async def apply_clock_shifts(database_url: str, shifts: list[tuple[uuid.UUID, float]]) -> None:
    dialect = dialect_of(database_url)
    by_seconds: dict[float, list[str]] = {}
    for run_id, seconds in shifts:
        by_seconds.setdefault(seconds, []).append(str(run_id))
    async with connect(database_url) as connection:
        for seconds, ids in by_seconds.items():
            for table, (columns, where) in _CLOCK_COLUMNS.items():
                assignments = ", ".join(f"{column} = {_shifted(dialect, column)}" for column in columns)
                statement = text(f"UPDATE {table} SET {assignments} WHERE {where}").bindparams(
                    bindparam("ids", expanding=True)
                )
                await connection.execute(statement, {"ids": ids, "seconds": seconds})
        await connection.commit()


async def break_runs(database_url: str, history: MessyHistory) -> None:
    """What only a crash or a manual purge leaves behind."""
    async with connect(database_url) as connection:
        if history.unknown_state:
            # Deleting the current state row: `state_id` becomes NULL (ON DELETE SET NULL).
            await connection.execute(
                text(
                    "DELETE FROM flow_run_state WHERE id IN (SELECT state_id FROM flow_run WHERE id IN :ids)"
                ).bindparams(bindparam("ids", expanding=True)),
                {"ids": [str(i) for i in history.unknown_state]},
            )
        if history.null_state_timestamp:
            await connection.execute(
                text("UPDATE flow_run SET state_timestamp = NULL WHERE id IN :ids").bindparams(
                    bindparam("ids", expanding=True)
                ),
                {"ids": [str(i) for i in history.null_state_timestamp]},
            )
        if history.terminal_without_end_time:
            await connection.execute(
                text("UPDATE flow_run SET end_time = NULL WHERE id IN :ids").bindparams(
                    bindparam("ids", expanding=True)
                ),
                {"ids": [str(i) for i in history.terminal_without_end_time]},
            )
        await connection.commit()


async def _wait_for_events(database_url: str, run_ids: list[uuid.UUID], timeout: float = 30) -> None:
    """Events are persisted by a server service in batches: wait until ours are stored."""
    if not run_ids:
        return
    resources = [f"prefect.flow-run.{run_id}" for run_id in run_ids]
    statement = text(
        "SELECT count(DISTINCT resource_id) FROM events "
        "WHERE event = 'prefect.flow-run.heartbeat' AND resource_id IN :ids"
    ).bindparams(bindparam("ids", expanding=True))
    deadline = asyncio.get_running_loop().time() + timeout
    async with connect(database_url) as connection:
        while True:
            stored = (await connection.execute(statement, {"ids": resources})).scalar_one()
            await connection.rollback()
            if stored >= len(resources):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"only {stored} of {len(resources)} heartbeat events were stored")
            await asyncio.sleep(0.5)


async def seed_messy_history(
    database_url: str, *, prefix: str = "demo", old_runs_per_deployment: int = 4, poison_pill: bool = True
) -> MessyHistory:
    """Create the messy history on the server of the current Prefect settings.

    `poison_pill=False` leaves out the Running run with a NULL `state_timestamp`, which makes
    every `/flow_runs/filter` page containing it answer 500 until it is repaired.
    """
    history = MessyHistory(prefix=prefix)
    now = datetime.now(UTC)
    async with prefect_client() as client:
        seeder = _Seeder(client, prefix)
        etl, report = f"{prefix}-etl", f"{prefix}-report"
        history.flow_names = [etl, report, f"{prefix}-adhoc"]
        history.tags = [f"{prefix}-team-a", f"{prefix}-team-b", f"{prefix}-keep"]
        team_a, team_b, keep = history.tags
        specs = [(etl, "nightly", [team_a]), (etl, "hourly", [team_b]), (report, "daily", [team_a])]
        for flow_name, name, tags in specs:
            history.deployments[f"{flow_name}/{name}"] = await seeder.deployment(flow_name, name, tags)

        # Old finished runs of every deployment and every terminal state, 40-400 days old.
        for index_deployment, (flow_name, name, tags) in enumerate(specs):
            deployment_id = history.deployments[f"{flow_name}/{name}"]
            for index in range(old_runs_per_deployment):
                state = TERMINAL_STATES[(index + index_deployment) % len(TERMINAL_STATES)]
                run_tags = tags + ([keep] if index == 0 and index_deployment == 0 else [])
                run_id = await seeder.flow_run(
                    flow_name, ["PENDING", "RUNNING", state], deployment_id=deployment_id, tags=run_tags
                )
                cache_key = f"{prefix}-cache-{index_deployment}-{index}" if index == 1 else None
                task_run_id = await seeder.task_run(run_id, ["RUNNING", "COMPLETED"], cache_key=cache_key)
                await seeder.task_run(run_id, ["RUNNING", "COMPLETED"])
                await seeder.logs(run_id, task_run_id, 3)
                key = f"{prefix}-{flow_name.split('-')[-1]}-{name}-summary" if index % 2 == 0 else None
                await seeder.artifact(run_id, key)
                if key and key not in history.keyed_artifact_keys:
                    history.keyed_artifact_keys.append(key)
                if key:
                    history.runs_by_artifact_key.setdefault(key, []).append(run_id)
                if keep in run_tags:
                    history.keep_tagged = run_id
                history.old_finished.append(run_id)
                history.old_finished_by_state.setdefault(state, []).append(run_id)
                history.old_finished_by_deployment.setdefault(f"{flow_name}/{name}", []).append(run_id)
                seeder.age([run_id], (40 + 45 * index + 7 * index_deployment) * DAY)

        # An old finished tree: parent -> subflow -> sub-subflow, all terminal.
        parent = await seeder.flow_run(f"{prefix}-adhoc", ["PENDING", "RUNNING", "COMPLETED"], tags=[team_b])
        wrapper = await seeder.task_run(parent, ["RUNNING", "COMPLETED"])
        child = await seeder.flow_run(
            f"{prefix}-adhoc", ["PENDING", "RUNNING", "COMPLETED"], parent_task_run_id=wrapper
        )
        child_wrapper = await seeder.task_run(child, ["RUNNING", "COMPLETED"])
        grandchild = await seeder.flow_run(
            f"{prefix}-adhoc", ["PENDING", "RUNNING", "FAILED"], parent_task_run_id=child_wrapper
        )
        await seeder.logs(grandchild, None, 2)
        await seeder.artifact(grandchild, None)
        history.old_finished += [parent, child, grandchild]
        history.old_tree += [parent, child, grandchild]
        history.old_subflows += [child, grandchild]
        for run_id, state in ((parent, "COMPLETED"), (child, "COMPLETED"), (grandchild, "FAILED")):
            history.old_finished_by_state.setdefault(state, []).append(run_id)
        seeder.age([parent, child, grandchild], 60 * DAY)

        # Recent finished runs: inside any sensible retention window.
        for index, (flow_name, name, tags) in enumerate(specs):
            run_id = await seeder.flow_run(
                flow_name,
                ["PENDING", "RUNNING", TERMINAL_STATES[index]],
                deployment_id=history.deployments[f"{flow_name}/{name}"],
                tags=tags,
            )
            await seeder.logs(run_id, None, 2)
            history.recent_finished.append(run_id)
            seeder.age([run_id], (index + 1) * DAY)

        # Runs shown as "Unknown": their current state row is gone.
        for index in range(3):
            run_id = await seeder.flow_run(etl, ["PENDING", "RUNNING", "COMPLETED"], tags=[team_a])
            await seeder.logs(run_id, None, 1)
            history.unknown_state.append(run_id)
            seeder.age([run_id], (50 + index) * DAY)

        # A cancelled parent whose subflows never left Cancelling.
        history.cancelled_parent = await seeder.flow_run(etl, ["PENDING", "RUNNING"], tags=[team_a])
        for _ in range(2):
            wrapper = await seeder.task_run(history.cancelled_parent, ["RUNNING"])
            history.cancelling_subflows.append(
                await seeder.flow_run(etl, ["PENDING", "RUNNING", "CANCELLING"], parent_task_run_id=wrapper)
            )
        await seeder.set_flow_run_state(history.cancelled_parent, "CANCELLING")
        await seeder.set_flow_run_state(history.cancelled_parent, "CANCELLED")
        seeder.age([history.cancelled_parent, *history.cancelling_subflows], 3 * HOUR)
        history.fresh_cancelling.append(await seeder.flow_run(etl, ["PENDING", "RUNNING", "CANCELLING"]))

        # Pending for hours (the worker died before the run started), and a fresh one.
        for _ in range(2):
            history.stuck_pending.append(await seeder.flow_run(report, ["PENDING"], tags=[team_a]))
        seeder.age(history.stuck_pending, 5 * HOUR)
        history.fresh_pending.append(await seeder.flow_run(report, ["PENDING"]))

        # Running: zombies (last heartbeat hours ago), healthy, and young without heartbeats.
        for _ in range(2):
            history.zombie_running.append(await seeder.flow_run(etl, ["PENDING", "RUNNING"], tags=[team_b]))
        seeder.age(history.zombie_running, 6 * HOUR)
        for run_id in history.zombie_running:
            await seeder.heartbeat(run_id, now - timedelta(hours=6))
            await seeder.heartbeat(run_id, now - timedelta(hours=3))
        history.healthy_running.append(await seeder.flow_run(etl, ["PENDING", "RUNNING"]))
        seeder.age(history.healthy_running, 5 * HOUR)
        await seeder.heartbeat(history.healthy_running[0], now - timedelta(seconds=30))
        history.running_without_heartbeat.append(await seeder.flow_run(report, ["PENDING", "RUNNING"]))

        # Late runs days past their start, and a run scheduled for tomorrow.
        for days in (3, 9):
            run_id = await seeder.flow_run(
                report,
                [],
                deployment_id=history.deployments[f"{report}/daily"],
                scheduled_for=now - timedelta(days=days),
                scheduled_name="Late",
            )
            history.late.append(run_id)
        history.scheduled_tomorrow.append(
            await seeder.flow_run(
                report,
                [],
                deployment_id=history.deployments[f"{report}/daily"],
                scheduled_for=now + timedelta(days=1),
            )
        )

        # The poison pill: Running with a NULL state_timestamp.
        if poison_pill:
            history.null_state_timestamp.append(await seeder.flow_run(etl, ["PENDING", "RUNNING"]))
            seeder.age(history.null_state_timestamp, 2 * HOUR)

        # Terminal runs without an end time (old enough to be deleted by age fallback).
        for state in ("COMPLETED", "CRASHED"):
            run_id = await seeder.flow_run(f"{prefix}-adhoc", ["PENDING", "RUNNING", state])
            history.terminal_without_end_time.append(run_id)
            history.terminal_without_end_time_by_state.setdefault(state, []).append(run_id)
            seeder.age([run_id], 70 * DAY)

        # A subflow still Running under an old finished parent.
        history.old_finished_parent = await seeder.flow_run(etl, ["PENDING", "RUNNING"], tags=[team_a])
        wrapper = await seeder.task_run(history.old_finished_parent, ["RUNNING", "COMPLETED"])
        history.running_subflow_under_finished_parent.append(
            await seeder.flow_run(etl, ["PENDING", "RUNNING"], parent_task_run_id=wrapper)
        )
        await seeder.set_flow_run_state(history.old_finished_parent, "FAILED")
        seeder.age([history.old_finished_parent, *history.running_subflow_under_finished_parent], 45 * DAY)

        # Task runs left Running inside a finished flow run.
        holder = await seeder.flow_run(report, ["PENDING", "RUNNING"])
        history.open_task_runs_in_finished_flow.append(await seeder.task_run(holder, ["RUNNING"]))
        await seeder.set_flow_run_state(holder, "COMPLETED")
        seeder.age([holder], 2 * HOUR)
        history.recent_finished.append(holder)

    await apply_clock_shifts(database_url, seeder.shifts)
    await break_runs(database_url, history)
    await _wait_for_events(database_url, history.zombie_running + history.healthy_running)
    return history


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    from pathlib import Path

    from tasks.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m localstack.seed", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--prefix", default="demo", help="names of the seeded flows, runs and tags start with it"
    )
    parser.add_argument("--json", type=Path, help="write the seeded ids, by category, here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = get_settings()
    if settings.database_url is None:
        raise SystemExit("set MAINTENANCE_DATABASE_URL (seeding moves clocks back with SQL)")
    history = asyncio.run(seed_messy_history(settings.database_url.get_secret_value(), prefix=args.prefix))
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(history), default=str, indent=1))
    for name, count in history.counts().items():
        print(f"{name:45} {count}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
