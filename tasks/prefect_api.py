"""The one way this project talks to the Prefect API.

A thin layer over Prefect's own client: `prefect_client()` opens it (Prefect already
retries 429 and 503 answers), and `call()` reaches routes the Python client has no
method for (`/flow_runs/bulk_delete`, `/flow_runs/bulk_set_state`, `/events/count-by/...`).
Nothing else in the project builds URLs or raw HTTP requests to Prefect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from prefect.client.base import ServerType
from prefect.client.orchestration import PrefectClient, get_client
from pydantic import AfterValidator

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
