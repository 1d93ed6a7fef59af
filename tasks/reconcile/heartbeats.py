"""The latest heartbeat of many flow runs at once.

Prefect's flow engine emits a `prefect.flow-run.heartbeat` event every
`PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds (180 by default) while a run is Running, with
the run as its resource (`prefect.flow-run.<id>`). A run's last heartbeat is its last
sign of life. With the database, detection reads it inline (`LATEST_HEARTBEAT_SQL`, one
index probe per run on `ix_events__event_resource_id_occurred`); through the API it is
one `POST /events/count-by/resource` per 200 runs, never a request per run.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from uuid import UUID

from prefect.client.orchestration import PrefectClient

from tasks.prefect_api import HEARTBEAT_EVENT, PAGE_SIZE, call, chunks

RESOURCE_PREFIX = "prefect.flow-run."

LATEST_HEARTBEAT_SQL = (
    "(SELECT max(heartbeat.occurred) FROM events AS heartbeat"
    f" WHERE heartbeat.event = '{HEARTBEAT_EVENT}'"
    f" AND heartbeat.resource_id = '{RESOURCE_PREFIX}' || CAST(run.id AS text))"
)

# count-by splits the time range into buckets of `time_unit`; it accepts at most 1,000.
_MAXIMUM_LOOKBACK = timedelta(days=999)


async def latest_by_resource(
    client: PrefectClient, event: str, resources: dict[str, list[str]], since: datetime | None = None
) -> list[dict]:
    """Per resource matching `resources` (an event resource filter): its name (`label`) and
    the first and last time it had `event` (`start_time`, `end_time`) since `since`."""
    now = datetime.now(UTC)
    since = max(since or now - _MAXIMUM_LOOKBACK, now - _MAXIMUM_LOOKBACK)
    return await call(
        client,
        "POST",
        "/events/count-by/resource",
        json={
            "filter": {
                "occurred": {"since": since.isoformat(), "until": now.isoformat()},
                "event": {"name": [event]},
                "resource": resources,
            },
            "time_unit": "day",
        },
    )


async def latest_heartbeats(
    client: PrefectClient, run_ids: Iterable[UUID], since: datetime
) -> dict[UUID, datetime]:
    """Run id -> time of its latest heartbeat event after `since`, for the runs that have one."""
    ids = list(dict.fromkeys(run_ids))
    latest: dict[UUID, datetime] = {}
    for chunk in chunks(ids, PAGE_SIZE):
        resources = {"id": [f"{RESOURCE_PREFIX}{run_id}" for run_id in chunk]}
        for count in await latest_by_resource(client, HEARTBEAT_EVENT, resources, since):
            latest[UUID(count["value"].removeprefix(RESOURCE_PREFIX))] = datetime.fromisoformat(
                count["end_time"]
            )
    return latest
