"""The maintenance work pool's type and the base job template `make deploy` creates it with.

`MAINTENANCE_WORK_POOL_TYPE` picks the type: `process` (the default: `make worker` runs
each flow run in a process of a checkout or the image) or `kubernetes` (the worker of
PrefectHQ's `prefect-worker` Helm chart runs each flow run as a Kubernetes Job, with the
values in deploy/kubernetes/). Either way the template starts from Prefect's default for
the type, the one `prefect work-pool create --type ...` gives: the installed worker's own
(prefect-kubernetes, in a checkout), else the server's copy of Prefect's worker registry.
So `make deploy` needs no Kubernetes package, and the same code runs with every supported
Prefect.

A kubernetes pool's Job, on top of that default:
- runs the project's image, `MAINTENANCE_IMAGE` (docker/Dockerfile; required: Prefect's
  own image has no maintenance flows);
- runs in `MAINTENANCE_KUBERNETES_NAMESPACE` (default `prefect`), the chart's namespace,
  where its role lets the worker create Jobs;
- takes its whole environment, the database URLs, from the Secret
  `MAINTENANCE_KUBERNETES_SECRET` (default `prefect-maintenance`) with `envFrom`: the pool,
  the deployments and the Job hold the Secret's name, never a URL or a password;
- asks for little (100m CPU, 256Mi memory, at most 1Gi; no CPU limit, the flows pace
  themselves), all four still variables a deployment can change;
- is deleted a day after it finishes: the reconcile deployment alone starts 144 a day.
Nothing is written into an existing pool: `make deploy` leaves its template as it is.
"""

from __future__ import annotations

import copy
from typing import Any

from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

from deploy import DeploymentConfigError
from tasks.settings import MaintenanceSettings

KUBERNETES = "kubernetes"
# The chart version whose values.schema.json deploy/kubernetes/worker-values.yaml is
# validated against (vendored beside it).
PREFECT_WORKER_CHART_VERSION = "2026.8.18172642"
FINISHED_JOB_TTL_SECONDS = 24 * 60 * 60
# The job variables behind the container's resources, with the maintenance defaults (None:
# no default, so Kubernetes sets none). Older default templates (a Prefect 3.4 server's
# copy, for one) have no such variables: they are added, so every kubernetes pool has them.
RESOURCE_VARIABLES: dict[str, tuple[str, str | None]] = {
    "cpu_request": ("CPU Request", "100m"),
    "memory_request": ("Memory Request", "256Mi"),
    "cpu_limit": ("CPU Limit", None),
    "memory_limit": ("Memory Limit", "1Gi"),
}
CONTAINER_RESOURCES = {
    "requests": {"cpu": "{{ cpu_request }}", "memory": "{{ memory_request }}"},
    "limits": {"cpu": "{{ cpu_limit }}", "memory": "{{ memory_limit }}"},
}


async def base_job_template(settings: MaintenanceSettings) -> dict[str, Any]:
    """The template a new maintenance pool of `settings.work_pool_type` is created with."""
    if settings.work_pool_type == KUBERNETES and not settings.image:
        raise DeploymentConfigError(
            "MAINTENANCE_IMAGE is not set: a kubernetes work pool runs each flow run in the "
            "project's image (docker/Dockerfile, pushed where your cluster pulls from), "
            "e.g. MAINTENANCE_IMAGE=registry.example.com/prefect-maintenance:0.1.0"
        )
    default = await get_default_base_job_template_for_infrastructure_type(settings.work_pool_type)
    if not default:
        raise DeploymentConfigError(
            f"Prefect has no default base job template for work pool type {settings.work_pool_type!r}"
        )
    if settings.work_pool_type == KUBERNETES:
        return maintenance_job_template(default, settings)
    return default


def maintenance_job_template(default: dict[str, Any], settings: MaintenanceSettings) -> dict[str, Any]:
    """Prefect's default kubernetes template with the maintenance Job's image, namespace,
    Secret, resources and time to live."""
    template = copy.deepcopy(default)
    variables = template["variables"]["properties"]
    variables["image"]["default"] = settings.image
    variables["namespace"]["default"] = settings.kubernetes_namespace
    variables["finished_job_ttl"]["default"] = FINISHED_JOB_TTL_SECONDS
    for name, (title, value) in RESOURCE_VARIABLES.items():
        variable = variables.setdefault(
            name, {"title": title, "type": "string", "description": "A Kubernetes resource quantity."}
        )
        if value is not None:
            variable["default"] = value
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    container["envFrom"] = [{"secretRef": {"name": settings.kubernetes_secret}}]
    container["resources"] = copy.deepcopy(CONTAINER_RESOURCES)
    return template
