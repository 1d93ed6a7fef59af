"""Run histories for the tests: arranging them, reading back what is in the database, waiting.

Runs are created through the Prefect API (flows, deployments, runs with their states,
task runs for subflow links, logs, artifacts); only their clocks are then moved back with
SQL, and a missing current state or end time is made the way a crash makes it. Every
history uses flow names of its own, so a test can scope the flows to it on a shared server.

What is left is read straight from the database of the settings (or of `database_url`):
`rows` and `scalar` bind a list, tuple or set value as `IN :name`, the same on PostgreSQL
and SQLite.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

import sqlalchemy as sa

from localstack.stack import PrefectServer
from tasks.database import APPLICATION_NAME, connect
from tasks.prefect_api import call, prefect_client

# Retention without pacing, vacuum or old events (heartbeats still go after their own day), for
# the tests about what goes.
QUICK = {"max_runs_per_second": 0, "events_older_than_days": None, "vacuum": False}
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
    # What the run stands for in its test, to find it again by `History.named`.
    name: str | None = None


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

    @property
    def named(self) -> dict[str, uuid.UUID]:
        """The runs planned with a name, by that name."""
        return {plan.name: run_id for run_id, plan in self.plans.items() if plan.name is not None}

    def in_batches(self, size: int) -> list[list[uuid.UUID]]:
        """The runs in the batches of `size` a purge of all of them takes: oldest first, and
        runs of one age in the order they were created (their clocks moved back alike)."""
        oldest_first = sorted(self.ids, key=lambda run_id: -self.plans[run_id].days_old)
        return [oldest_first[start : start + size] for start in range(0, len(oldest_first), size)]

    def non_terminal(self) -> set[uuid.UUID]:
        """Runs that are not known to be finished: non-terminal states and runs without a state."""
        return {
            run_id
            for run_id, plan in self.plans.items()
            if plan.state_type in NON_TERMINAL or plan.unknown_state
        }


def flow_names_of(prefix: str) -> list[str]:
    """The flows of the history made with `prefix`: top-level runs, then subflows."""
    return [f"{prefix}-parent", f"{prefix}-child"]


async def create_history(prefix: str, plans: list[PlannedRun]) -> History:
    """Create `plans` (a parent always comes before its subflows) and arrange their clocks."""
    flow_names = flow_names_of(prefix)
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


async def move_back(database_url: str | None, run_ids: Iterable[uuid.UUID], hours: float) -> None:
    """These flow runs entered their current state `hours` earlier (and started and were created so)."""
    shift = "make_interval(secs => :seconds)"
    async with connect(database_url) as connection:
        for statement in (
            f"UPDATE flow_run SET state_timestamp = state_timestamp - {shift}, "
            f"start_time = start_time - {shift}, created = created - {shift} WHERE id IN :ids",
            f"UPDATE flow_run_state SET timestamp = timestamp - {shift} WHERE flow_run_id IN :ids",
        ):
            await connection.execute(
                sa.text(statement).bindparams(sa.bindparam("ids", expanding=True)),
                {"ids": [str(run_id) for run_id in run_ids], "seconds": hours * 3600},
            )
        await connection.commit()


async def create_flow_run(flow_name: str, states: list[str], **fields) -> uuid.UUID:
    """A run of `flow_name` (made if new) through the API, forced through `states` in turn."""
    async with prefect_client() as client:
        flow = await call(client, "POST", "/flows/", json={"name": flow_name})
        run = await call(client, "POST", "/flow_runs/", json={"flow_id": flow["id"], **fields})
        for state in states:
            await call(
                client,
                "POST",
                f"/flow_runs/{run['id']}/set_state",
                json={"state": {"type": state, "name": state.title()}, "force": True},
            )
    return uuid.UUID(run["id"])


async def list_all_flow_runs() -> int:
    """How many flow runs the API's listing shows (its first page)."""
    async with prefect_client() as client:
        listed = await call(client, "POST", "/flow_runs/filter", json={"limit": 200})
    return len(listed)


# What is in the database ----------------------------------------------------------------


def database_of(server: PrefectServer) -> str:
    """The name of the server's database on the session PostgreSQL (for `stack.postgres.psql`)."""
    return urlsplit(server.database_url).path.lstrip("/")


def _bound(value):
    """UUIDs as text, which both backends compare with their id columns. An empty list binds
    as NULL, which nothing equals: SQLAlchemy types an empty `IN` INTEGER, and PostgreSQL
    compares no uuid with that."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_bound(item) for item in value] or [None]
    return str(value) if isinstance(value, uuid.UUID) else value


async def rows(sql: str, *, database_url: str | None = None, **values) -> list[sa.Row]:
    statement = sa.text(sql)
    lists = [name for name, value in values.items() if isinstance(value, (list, tuple, set, frozenset))]
    if lists:
        statement = statement.bindparams(*(sa.bindparam(name, expanding=True) for name in lists))
    async with connect(database_url) as connection:
        found = await connection.execute(statement, {name: _bound(value) for name, value in values.items()})
        return list(found)


async def scalar(sql: str, *, database_url: str | None = None, **values):
    return (await rows(sql, database_url=database_url, **values))[0][0]


async def existing(run_ids: Iterable[uuid.UUID], *, database_url: str | None = None) -> set[uuid.UUID]:
    """Which of these flow runs are still in the database."""
    found = await rows(
        "SELECT id FROM flow_run WHERE id IN :ids", database_url=database_url, ids=list(run_ids)
    )
    return {uuid.UUID(str(row.id)) for row in found}


async def owned_rows(run_ids: Iterable[uuid.UUID], *, database_url: str | None = None) -> dict[str, int]:
    """Rows that belong to these flow runs, per table: zero everywhere once the runs are gone."""
    ids = list(run_ids)
    counts = {}
    for table in ("flow_run_state", "task_run", "log", "artifact"):
        counts[table] = await scalar(
            f"SELECT count(*) FROM {table} WHERE flow_run_id IN :ids", database_url=database_url, ids=ids
        )
    return counts


@dataclass
class RunState:
    state_id: uuid.UUID | None
    state_type: str | None
    state_name: str | None
    state_timestamp: datetime | None
    message: str | None


async def run_states(database_url: str | None = None) -> dict[uuid.UUID, RunState]:
    """Every flow run and task run with its current state."""
    query = """
        SELECT run.id, run.state_id, CAST(run.state_type AS text), run.state_name, run.state_timestamp,
               state.message
        FROM {table} AS run LEFT JOIN {table}_state AS state ON state.id = run.state_id
    """
    states = {}
    for table in ("flow_run", "task_run"):
        for row in await rows(query.format(table=table), database_url=database_url):
            states[uuid.UUID(str(row[0]))] = RunState(*row[1:])
    return states


async def split_trees(history: History) -> set[uuid.UUID]:
    """Surviving subflows that lost their parent: turned into fake top-level runs."""
    subflows = list(history.parent_of)
    found = await rows(
        "SELECT child.id FROM flow_run child "
        "LEFT JOIN task_run link ON link.id = child.parent_task_run_id "
        "LEFT JOIN flow_run parent ON parent.id = link.flow_run_id "
        "WHERE child.id IN :ids AND parent.id IS NULL",
        ids=subflows,
    )
    return {row.id for row in found}


async def dangling_collections(keys: Iterable[str]) -> int:
    """Artifact collections of these keys whose latest artifact is gone."""
    return await scalar(
        "SELECT count(*) FROM artifact_collection c WHERE c.key IN :keys "
        "AND NOT EXISTS (SELECT 1 FROM artifact a WHERE a.id = c.latest_id)",
        keys=list(keys),
    )


# Waiting ----------------------------------------------------------------------------------


async def wait_for(condition, *, what: str, timeout: float = 30, pause: float = 0.05):
    """Poll `condition()` (async) until it returns something truthy, for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        await asyncio.sleep(pause)


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


async def waiting_maintenance_session(watcher, terminated: set[int], *, what: str) -> int:
    """The pid of the maintenance session waiting on a held lock, once there is one (not one
    already `terminated`)."""
    return await wait_for(
        lambda: session_waiting_for_a_lock(watcher, application_name=APPLICATION_NAME, exclude=terminated),
        what=what,
    )


async def terminate_waiting_maintenance_session(watcher, terminated: set[int]) -> bool:
    """Terminate the maintenance session waiting on a held lock; whether it was terminated."""
    pid = await waiting_maintenance_session(
        watcher, terminated, what="a maintenance session waiting for the held lock"
    )
    killed = (await watcher.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})).scalar()
    terminated.add(pid)
    return killed


async def wait_for_event(database_url: str | None, run_id: uuid.UUID, event: str) -> None:
    """The server stores events a moment after what emits them: wait until this run's `event` is stored."""

    async def stored() -> int:
        return await scalar(
            "SELECT count(*) FROM events WHERE event = :event AND resource_id = :resource",
            database_url=database_url,
            event=event,
            resource=f"prefect.flow-run.{run_id}",
        )

    await wait_for(stored, what=f"the {event} event of {run_id}", pause=0.5)


class DeadlineAfterChecks:
    """A deadline that has not passed for its first `allowed` checks, and has from then on."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed

    @property
    def passed(self) -> bool:
        self.allowed -= 1
        return self.allowed < 0


# After a reconcile pass --------------------------------------------------------------------
# `passes` holds the states before and after the real pass (`before`, `after_real`) and its
# report (`real`).


def assert_ended(passes, run_ids, state_type: str, rule: str, state_name: str | None = None) -> None:
    assert run_ids, "the seeded history has runs of this kind"
    for run_id in run_ids:
        state = passes.after_real[run_id]
        assert state.state_type == state_type, f"{run_id} should be {state_type}, is {state.state_type}"
        if state_name:
            assert state.state_name == state_name
        assert f"rule {rule}:" in state.message
    assert set(run_ids) <= set(passes.real.rule(rule).ids("fixed"))


def assert_untouched(passes, run_ids) -> None:
    assert run_ids, "the seeded history has runs of this kind"
    for run_id in run_ids:
        assert passes.after_real[run_id].state_id == passes.before[run_id].state_id, f"{run_id} was changed"


def flags_of(report, check: str) -> dict[str, object]:
    """A health report's flags of one check, by the object they name."""
    return {flag.object: flag for flag in report.flags if flag.check == check}
