"""The ids of Running flow runs the API cannot read, learnt from their events.

A Running run with a NULL `state_timestamp` (the poison pill) fails every read that would
return it, so no listing shows its id. From 3.6.16 the server repairs such runs by a
filter (`bulk_set_state`); older servers change a run only by its id. That id is in the
run's history: entering Running emitted a `prefect.flow-run.Running` event whose resource
is `prefect.flow-run.<id>`. Every such run is a candidate; `/flow_runs/count`, which
never returns a row and so never fails on one, keeps those Running now and in scope, in
halves down to single ids; a candidate is confirmed when reading it fails while those
counts succeed. Cost: one `count-by/resource` call listing every run that entered Running
within the events' retention, then about one count per 1,000 of them.

A run whose Running event is gone (events are kept for `PREFECT_EVENTS_RETENTION_PERIOD`,
7 days by default) cannot be found this way: only the database, or a newer server, can
repair it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient

from tasks.prefect_api import PrefectApiError, call, chunks
from tasks.reconcile.heartbeats import RESOURCE_PREFIX, latest_by_resource

RUNNING_EVENT = "prefect.flow-run.Running"
# Ids per `/flow_runs/count` call: the answer is one number, so the only limit is the body.
_COUNT_CHUNK = 1000


@dataclass(frozen=True)
class UnreadableRun:
    run_id: UUID
    run_name: str


async def find_unreadable_running_runs(
    client: PrefectClient,
    flow_runs: dict[str, Any],
    flows: dict[str, Any],
    readable: Collection[UUID],
) -> list[UnreadableRun]:
    """Running runs matching the `flow_runs` and `flows` filters that the API cannot read,
    found through their Running events; `readable` are the ones a listing just returned."""
    counts = await latest_by_resource(client, RUNNING_EVENT, {"id_prefix": [RESOURCE_PREFIX]})
    names = {UUID(count["value"].removeprefix(RESOURCE_PREFIX)): count["label"] for count in counts}
    readable = set(readable)
    candidates = [run_id for run_id in names if run_id not in readable]
    running: list[UUID] = []
    for chunk in chunks(candidates, _COUNT_CHUNK):
        running += await _running_among(client, flow_runs, flows, chunk)
    return [
        UnreadableRun(run_id, names[run_id]) for run_id in running if await _fails_to_read(client, run_id)
    ]


async def _running_among(
    client: PrefectClient, flow_runs: dict[str, Any], flows: dict[str, Any], run_ids: list[UUID]
) -> list[UUID]:
    body = {
        "flow_runs": {**flow_runs, "id": {"any_": [str(run_id) for run_id in run_ids]}},
        "flows": flows or None,
    }
    count = await call(client, "POST", "/flow_runs/count", json=body)
    if count == 0:
        return []
    if len(run_ids) == 1:
        return run_ids
    middle = len(run_ids) // 2
    return await _running_among(client, flow_runs, flows, run_ids[:middle]) + await _running_among(
        client, flow_runs, flows, run_ids[middle:]
    )


async def _fails_to_read(client: PrefectClient, run_id: UUID) -> bool:
    """True when the run exists (it was just counted) but the server cannot return it."""
    try:
        await call(client, "GET", f"/flow_runs/{run_id}")
    except PrefectApiError as error:
        if error.status_code == 500:
            return True
        if error.status_code == 404:  # deleted since it was counted
            return False
        raise
    return False  # readable: it entered Running after the listing, or was repaired meanwhile
