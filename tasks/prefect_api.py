"""The one way this project talks to the Prefect API.

A thin layer over Prefect's own client: `prefect_client()` opens it (Prefect already
retries 429 and 503 answers), and `call()` reaches routes the Python client has no
method for (`/flow_runs/bulk_delete`, `/flow_runs/bulk_set_state`, `/events/count-by/...`).
Around them: paging (`paginate`, `chunks`), reading runs by id and every row of a filter
even where a poison pill makes pages answer 500, names by id, the API's timestamps, and
what the server's version has (`server_has`). Nothing else in the project builds URLs or
raw HTTP requests to Prefect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar, get_args
from uuid import UUID

import httpx
from prefect.client.base import ServerType
from prefect.client.orchestration import PrefectClient, get_client
from pydantic import AfterValidator

RunKind = Literal["flow_run", "task_run"]
# Prefect's terminal state types (`prefect.client.schemas.objects.TERMINAL_STATES`), in the
# order the reports list them.
TerminalState = Literal["COMPLETED", "FAILED", "CANCELLED", "CRASHED"]
TERMINAL_STATES: tuple[TerminalState, ...] = get_args(TerminalState)
T = TypeVar("T")
# The API returns at most this many rows per filter call.
PAGE_SIZE = 200
# `bulk_delete` and `bulk_set_state` accept at most this many runs per call.
BULK_LIMIT = 50
# The event a running flow emits every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds.
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"

# The first server version with each behaviour the flows depend on (measured on real
# servers of each version; the README's support table says what each one changes).
DELETES_LOGS_OF_DELETED_RUNS = (3, 4, 9)
EVENT_STREAM_ACCEPTS_AUTH = (3, 6, 14)
BULK_FLOW_RUN_ROUTES = (3, 6, 16)  # POST /flow_runs/bulk_delete and /flow_runs/bulk_set_state
DEPLOYMENT_SCHEDULE_REPLACES = (3, 6, 17)
DB_VACUUM_SETTINGS = (3, 6, 19)  # server.services.db_vacuum in GET /admin/settings
# Prefect Cloud has no server version to compare (Prefect's own client skips its version
# check there): it is taken to have every behaviour above.
CLOUD_VERSION = (999,)


def _flow_slash_deployment(name: str) -> str:
    flow_name, slash, deployment_name = name.partition("/")
    if not (flow_name and slash and deployment_name):
        raise ValueError(f"{name!r} is not of the form 'flow-name/deployment-name'")
    return name


# How Prefect names a deployment across flows; checked where parameters are validated.
DeploymentName = Annotated[str, AfterValidator(_flow_slash_deployment)]


class PrefectApiError(RuntimeError):
    """An API call that failed; carries the status code and the route, nothing secret."""

    def __init__(self, method: str, path: str, status_code: int | None, detail: str) -> None:
        self.method = method
        self.path = path
        self.status_code = status_code
        super().__init__(f"{method} {path} failed ({status_code or 'no answer'}): {detail[:300]}")


@asynccontextmanager
async def prefect_client() -> AsyncIterator[PrefectClient]:
    async with get_client() as client:
        yield client


async def call(client: PrefectClient, method: str, path: str, json: Any = None, params: Any = None) -> Any:
    """One request to the API; returns the decoded JSON body (or None when there is none)."""
    try:
        response = await client._client.request(method, path, json=json, params=params)
    except httpx.HTTPStatusError as error:
        raise PrefectApiError(method, path, error.response.status_code, error.response.text) from None
    except httpx.TransportError as error:
        raise PrefectApiError(method, path, None, type(error).__name__) from None
    if response.status_code >= 400:
        raise PrefectApiError(method, path, response.status_code, response.text)
    if not response.content:
        return None
    return response.json()


def chunks(values: Iterable[T], size: int) -> Iterator[list[T]]:
    """`values` in lists of at most `size`: the pages and bulk calls the API takes."""
    values = list(values)
    for start in range(0, len(values), size):
        yield values[start : start + size]


def version_tuple(version: str) -> tuple[int, ...]:
    """'3.4.25' -> (3, 4, 25); what follows the numbers (a pre-release or local tag) is ignored."""
    numbers = []
    for part in version.split("."):
        digits = ""
        for character in part:
            if not character.isdigit():
                break
            digits += character
        if not digits:
            break
        numbers.append(int(digits))
        if digits != part:
            break
    return tuple(numbers)


def version_text(version: tuple[int, ...]) -> str:
    """(3, 4, 25) -> '3.4.25'."""
    return ".".join(map(str, version))


_server_versions: dict[str, tuple[int, ...]] = {}


async def server_version(client: PrefectClient) -> tuple[int, ...]:
    """The Prefect version of the server `client` talks to (`GET /admin/version`), asked once
    per API URL and process."""
    if client.server_type == ServerType.CLOUD:
        return CLOUD_VERSION
    api_url = str(client.api_url)
    if api_url not in _server_versions:
        _server_versions[api_url] = version_tuple(await call(client, "GET", "/admin/version"))
    return _server_versions[api_url]


async def server_has(client: PrefectClient, first_version: tuple[int, ...]) -> bool:
    """True when the server is at least `first_version` (one of the constants above)."""
    return await server_version(client) >= first_version


async def paginate(
    client: PrefectClient, path: str, body: dict[str, Any], limit: int | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Every row a `/.../filter` route returns for `body`, 200 at a time."""
    offset = 0
    seen = 0
    while True:
        page_size = PAGE_SIZE if limit is None else min(PAGE_SIZE, limit - seen)
        if page_size <= 0:
            return
        rows = await call(client, "POST", path, json={**body, "limit": page_size, "offset": offset})
        for row in rows:
            yield row
        seen += len(rows)
        offset += len(rows)
        if len(rows) < page_size:
            return


# Runs whose rows the server cannot serialise -------------------------------------
# A Running run with a NULL `state_timestamp` makes every page holding it answer 500
# (upstream #20779): the readers below read such pages again in parts and count the rows
# that fail alone instead of stopping.


def api_time(value: str | None) -> datetime | None:
    """A timestamp as the API writes it (ISO 8601), or None."""
    return datetime.fromisoformat(value) if value else None


def api_uuid(value: str | None) -> UUID | None:
    return UUID(value) if value else None


# A failing page is read again in this many parts: each 500 costs the server a logged
# traceback, so fewer, wider levels beat halving.
_SPLIT = 8


async def _read_page(
    client: PrefectClient, path: str, body: dict, offset: int, limit: int
) -> tuple[list, int]:
    try:
        return await call(client, "POST", path, json={**body, "offset": offset, "limit": limit}), 0
    except PrefectApiError as error:
        if error.status_code != 500:
            raise
        if limit == 1:
            return [], 1
    rows: list = []
    failed = 0
    step = -(-limit // _SPLIT)
    for part in range(offset, offset + limit, step):
        part_rows, part_failed = await _read_page(client, path, body, part, min(step, offset + limit - part))
        rows += part_rows
        failed += part_failed
        if len(part_rows) + part_failed < min(step, offset + limit - part):
            break  # past the last row
    return rows, failed


async def read_every_row(client: PrefectClient, path: str, body: dict) -> tuple[list[dict], int]:
    """Every row of a `/.../filter` route, and how many rows the server could not serialise."""
    rows: list[dict] = []
    unreadable = 0
    offset = 0
    while True:
        page, failed = await _read_page(client, path, body, offset, PAGE_SIZE)
        rows += page
        unreadable += failed
        if len(page) + failed < PAGE_SIZE:
            return rows, unreadable
        offset += PAGE_SIZE


async def read_runs_by_id(
    client: PrefectClient, run_kind: RunKind, run_ids: Iterable[UUID]
) -> tuple[dict[UUID, dict], set[UUID]]:
    """Current rows of these runs by id, and the ids whose row the server cannot serialise
    (flow runs hit by the NULL `state_timestamp` bug). Ids of deleted runs are in neither."""
    ids = list(dict.fromkeys(run_ids))
    if not ids:
        return {}, set()
    path, key = (
        ("/flow_runs/filter", "flow_runs") if run_kind == "flow_run" else ("/task_runs/filter", "task_runs")
    )
    body = {key: {"id": {"any_": [str(run_id) for run_id in ids]}}, "limit": len(ids)}
    try:
        return {UUID(row["id"]): row for row in await call(client, "POST", path, json=body)}, set()
    except PrefectApiError as error:
        if error.status_code != 500:
            raise
        if len(ids) == 1:
            return {}, set(ids)
    middle = len(ids) // 2
    first, first_unreadable = await read_runs_by_id(client, run_kind, ids[:middle])
    second, second_unreadable = await read_runs_by_id(client, run_kind, ids[middle:])
    return first | second, first_unreadable | second_unreadable


async def read_runs_in_chunks(
    client: PrefectClient, run_kind: RunKind, run_ids: Iterable[UUID]
) -> tuple[dict[UUID, dict], set[UUID]]:
    """`read_runs_by_id` for any number of ids, a page at a time."""
    ids = list(dict.fromkeys(run_ids))
    rows: dict[UUID, dict] = {}
    unreadable: set[UUID] = set()
    for chunk in chunks(ids, PAGE_SIZE):
        chunk_rows, chunk_unreadable = await read_runs_by_id(client, run_kind, chunk)
        rows |= chunk_rows
        unreadable |= chunk_unreadable
    return rows, unreadable


async def flow_names_by_id(client: PrefectClient, flow_ids: Iterable[str]) -> dict[str, str]:
    """Flow id -> flow name, a page at a time."""
    ids = sorted(set(flow_ids))
    names: dict[str, str] = {}
    for chunk in chunks(ids, PAGE_SIZE):
        rows = await call(
            client, "POST", "/flows/filter", json={"flows": {"id": {"any_": chunk}}, "limit": len(chunk)}
        )
        names |= {row["id"]: row["name"] for row in rows}
    return names
