"""The API engine's archive rows: a batch's run trees read through the Prefect API, in the
table-row shape the SQL engine archives (`tasks.retention.archive`), so one restore
(`tasks.retention.sql_archive`) serves both.

The API returns each object with its table's columns under the same names; what it nests
instead (a run's current state) gives the column it stands for (`state_timestamp`), what it
leaves out (`created` of a state...) the restore fills with the column's default, and what
it adds (estimates, the nested state) is dropped.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.server.database import orm_models

from tasks.prefect_api import PAGE_SIZE, call, chunks, paginate

T = TypeVar("T")
Backoff = Callable[[Callable[[], Awaitable[T]]], Awaitable[T]]
COLUMNS = {
    table.name: {column.name for column in table.columns} for table in orm_models.Base.metadata.sorted_tables
}
# Inputs a run holds are a few; one call reads them all.
INPUTS_PER_RUN = 10_000


def _row(table: str, item: dict[str, Any], **columns: Any) -> str:
    """An API object as its table's row (JSON text)."""
    state = item.get("state") or {}
    if "state_timestamp" in COLUMNS[table] and state:
        columns.setdefault("state_timestamp", state.get("timestamp"))
    merged = {**item, **columns}
    return json.dumps({name: value for name, value in merged.items() if name in COLUMNS[table]})


async def api_batch_rows(
    client: PrefectClient, with_backoff: Backoff, flow_run_ids: list[UUID]
) -> dict[str, list[str]]:
    """Every row the runs own, per table, read through the API (with the engine's back-off)."""

    async def every(path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        async def pages() -> list[dict[str, Any]]:
            return [row async for row in paginate(client, path, body)]

        return await with_backoff(pages)

    async def one(method: str, path: str, **arguments: Any) -> Any:
        return await with_backoff(lambda: call(client, method, path, **arguments))

    rows: dict[str, list[str]] = {table: [] for table in ("flow", "flow_run", "task_run", "artifact")}
    rows.update({table: [] for table in ("flow_run_state", "task_run_state", "flow_run_input", "log")})
    for chunk in chunks([str(run_id) for run_id in flow_run_ids], PAGE_SIZE):
        by_run = {"any_": chunk}
        runs = await every("/flow_runs/filter", {"flow_runs": {"id": by_run}})
        rows["flow_run"] += [_row("flow_run", run) for run in runs]
        flow_ids = sorted({run["flow_id"] for run in runs})
        rows["flow"] += [
            _row("flow", row) for row in await every("/flows/filter", {"flows": {"id": {"any_": flow_ids}}})
        ]
        task_runs = await every("/task_runs/filter", {"task_runs": {"flow_run_id": by_run}})
        rows["task_run"] += [_row("task_run", task_run) for task_run in task_runs]
        rows["artifact"] += [
            _row("artifact", row)
            for row in await every("/artifacts/filter", {"artifacts": {"flow_run_id": by_run}})
        ]
        rows["log"] += [
            _row("log", row) for row in await every("/logs/filter", {"logs": {"flow_run_id": by_run}})
        ]
        for run_id in chunk:
            for state in await one("GET", "/flow_run_states/", params={"flow_run_id": run_id}):
                rows["flow_run_state"].append(_row("flow_run_state", state, flow_run_id=run_id))
            inputs = await one(
                "POST", f"/flow_runs/{run_id}/input/filter", json={"prefix": "", "limit": INPUTS_PER_RUN}
            )
            rows["flow_run_input"] += [_row("flow_run_input", row) for row in inputs]
        for task_run in task_runs:
            for state in await one("GET", "/task_run_states/", params={"task_run_id": task_run["id"]}):
                rows["task_run_state"].append(_row("task_run_state", state, task_run_id=task_run["id"]))
    return rows
