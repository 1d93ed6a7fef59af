"""Each deployment of prefect.yaml as a request the server accepts, then sent to it.

The request holds what prefect.yaml says, in the fields of `POST /deployments/`: the
flow is loaded from its entrypoint for its name, description, version and parameter
schema (Prefect's own `parameter_schema`); `{{ $VARIABLE }}` placeholders are filled from
the environment, except in the pull steps, which the worker resolves when each run
starts. Nothing else is sent: no field that only newer servers know.

Before anything is written, every request is checked against the schema the server
itself publishes for `POST /deployments/` (its `/openapi.json`), so a field that server
does not know fails the deploy with its name, and nothing is changed; no list of versions
is kept here. The server upserts
on flow and deployment name: a deployment keeps its id, its fields take the values sent,
and its schedules are replaced by the ones sent, never added to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from prefect.client.orchestration import PrefectClient
from prefect.exceptions import ObjectNotFound
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema
from prefect.utilities.templating import apply_values, find_placeholders

from deploy import PROJECT_ROOT, DeploymentConfigError
from tasks.prefect_api import call

# Keys of a prefect.yaml schedule that belong to the deployment's schedule record; the
# others (cron, interval, rrule, timezone, ...) describe the schedule itself.
SCHEDULE_RECORD_KEYS = ("active", "parameters", "slug")


@dataclass(frozen=True)
class DeploymentRequest:
    """The body of `POST /deployments/` for one deployment, but for the flow's id, which
    the server gives when the flow is created."""

    flow_name: str
    body: dict[str, Any]

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.body['name']}"


def deployment_requests(document: dict[str, Any]) -> list[DeploymentRequest]:
    """The requests of every deployment of prefect.yaml (`document`), in its order, with
    `{{ $VARIABLE }}` placeholders taken from this process's environment."""
    default_pull_steps = document.get("pull") or []
    return [deployment_request(deployment, default_pull_steps) for deployment in document["deployments"]]


def deployment_request(
    deployment: dict[str, Any], default_pull_steps: list[dict[str, Any]]
) -> DeploymentRequest:
    fields = dict(deployment)
    name = fields.get("name")
    if not fields.get("entrypoint"):
        raise DeploymentConfigError(f"deployment {name!r} in prefect.yaml has no entrypoint")
    pull_steps = fields.pop("pull", default_pull_steps)
    # Prefect fills `{{ $NAME }}` from os.environ; no other placeholder has a value here.
    fields = apply_values(fields, {}, remove_notset=False)
    unresolved = sorted(placeholder.full_match for placeholder in find_placeholders(fields))
    if unresolved:
        raise DeploymentConfigError(
            f"deployment {name!r} in prefect.yaml: {', '.join(unresolved)} has no value when "
            "deploying (only `{{ $VARIABLE }}` is filled, from the environment)"
        )
    path, _, function = fields["entrypoint"].rpartition(":")
    flow = load_flow_from_entrypoint(f"{PROJECT_ROOT / path}:{function}")
    work_pool = fields.pop("work_pool", None) or {}
    schedules = fields.pop("schedules", None) or []
    concurrency = fields.pop("concurrency_limit", None)
    body: dict[str, Any] = {
        "description": flow.description,
        "version": flow.version,
        "parameter_openapi_schema": parameter_schema(flow).model_dump(exclude_unset=True),
        "work_pool_name": work_pool.get("name"),
        "work_queue_name": work_pool.get("work_queue_name"),
        "job_variables": work_pool.get("job_variables") or {},
        "pull_steps": pull_steps,
        "schedules": [schedule_record(schedule) for schedule in schedules],
        **fields,
    }
    if isinstance(concurrency, dict):
        options = dict(concurrency)
        body["concurrency_limit"] = options.pop("limit", None)
        body["concurrency_options"] = options
    elif concurrency is not None:
        body["concurrency_limit"] = concurrency
    return DeploymentRequest(flow_name=flow.name, body=body)


def schedule_record(schedule: dict[str, Any]) -> dict[str, Any]:
    """A prefect.yaml schedule (`cron: ...`, `timezone: ...`, `active: ...`) as the API's
    schedule record (`{"schedule": {"cron": ..., "timezone": ...}, "active": ...}`)."""
    record = {key: schedule[key] for key in SCHEDULE_RECORD_KEYS if key in schedule}
    record.setdefault("active", True)
    record["schedule"] = {key: value for key, value in schedule.items() if key not in SCHEDULE_RECORD_KEYS}
    return record


async def check_accepted(client: PrefectClient, requests: list[DeploymentRequest]) -> None:
    """Every request fits the body the server's `POST /deployments/` accepts; otherwise
    one error naming each field it refuses, before anything is written."""
    document = await call(client, "GET", "/openapi.json")
    reference = document["paths"]["/deployments/"]["post"]["requestBody"]["content"]["application/json"]
    body_schema = document["components"]["schemas"][reference["schema"]["$ref"].rsplit("/", 1)[-1]]
    # The flow's id is added when the flow is created, after this check.
    required = [field for field in body_schema.get("required", []) if field != "flow_id"]
    validator = Draft202012Validator(
        {**body_schema, "required": required, "components": known_fields_only(document["components"])}
    )
    refused = []
    for request in requests:
        error = best_match(validator.iter_errors(request.body))
        if error is not None:
            where = "/".join(str(part) for part in error.absolute_path) or "the deployment"
            refused.append(f"{request.full_name}: {where}: {error.message}")
    if refused:
        version = await call(client, "GET", "/admin/version")
        raise DeploymentConfigError(
            f"the Prefect {version} server does not accept these deployments of prefect.yaml "
            "(nothing was changed): " + "; ".join(refused)
        )


def known_fields_only(components: dict[str, Any]) -> dict[str, Any]:
    """The schemas with every object that lists its fields closed to others: some servers
    ignore a field they do not know (3.4's `concurrency_options` drops a grace period)
    instead of refusing it, which would lose that part of prefect.yaml without a word."""
    schemas = {
        name: {"additionalProperties": False, **schema} if "properties" in schema else schema
        for name, schema in components["schemas"].items()
    }
    return {**components, "schemas": schemas}


async def apply_deployment(client: PrefectClient, request: DeploymentRequest) -> str:
    """Create or update the deployment (and its flow, by name); says which it did."""
    try:
        await client.read_deployment_by_name(request.full_name)
        outcome = "updated"
    except ObjectNotFound:
        outcome = "created"
    flow_id = await client.create_flow_from_name(request.flow_name)
    await call(client, "POST", "/deployments/", json={**request.body, "flow_id": str(flow_id)})
    return f"deployment {request.full_name!r}: {outcome}"
