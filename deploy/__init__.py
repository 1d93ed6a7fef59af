"""Deploying the maintenance flows: the work pool, its single queue, the deployments, the worker.

`prefect.yaml` is the one place that names the pool, the queue and the deployments; the
bootstrap (`python -m deploy.bootstrap`, `make deploy`) and the worker
(`python -m deploy.worker`, `make worker`) read them from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_FILE = PROJECT_ROOT / "prefect.yaml"
# The locked requirements of each supported Prefect version, for a worker of an older server.
PREFECT_VERSIONS_DIR = PROJECT_ROOT / "prefect-versions"


class DeploymentConfigError(RuntimeError):
    """prefect.yaml, the Prefect API or the environment is not what deploying needs."""


@dataclass(frozen=True)
class MaintenanceQueue:
    """The work pool and the work queue every maintenance deployment runs on."""

    pool: str
    queue: str


def read_prefect_file(prefect_file: Path = PREFECT_FILE) -> dict[str, Any]:
    """prefect.yaml, with its anchors and merge keys resolved."""
    return yaml.safe_load(prefect_file.read_text()) or {}


def read_deployments(prefect_file: Path = PREFECT_FILE) -> list[dict[str, Any]]:
    """The deployments of prefect.yaml."""
    deployments = read_prefect_file(prefect_file).get("deployments") or []
    if not deployments:
        raise DeploymentConfigError(f"{prefect_file} defines no deployments")
    return deployments


def maintenance_queue(deployments: list[dict[str, Any]]) -> MaintenanceQueue:
    """The one pool and queue of all deployments; several would mean several workers."""
    queues = {
        MaintenanceQueue(
            pool=(deployment.get("work_pool") or {}).get("name"),
            queue=(deployment.get("work_pool") or {}).get("work_queue_name"),
        )
        for deployment in deployments
    }
    if len(queues) != 1 or None in {field for queue in queues for field in (queue.pool, queue.queue)}:
        raise DeploymentConfigError(
            "every deployment in prefect.yaml must name the same work_pool.name and "
            f"work_pool.work_queue_name; found {sorted(map(str, queues))}"
        )
    return queues.pop()


def require_api_url() -> str:
    """The configured PREFECT_API_URL; without one Prefect would start a throwaway server."""
    from prefect.settings import get_current_settings

    api_url = get_current_settings().api.url
    if not api_url:
        raise DeploymentConfigError(
            "PREFECT_API_URL is not set: point it at your Prefect server, "
            "e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return api_url
