"""The reconcile flow's parameters, validated once before anything is read or changed.

The flow's signature carries the types the Prefect UI renders as a form; this model
carries the rules, in the shape of every flow's (`tasks.parameters`). A bad value raises
`ParameterError`, whose message starts with the parameter's name.
"""

from __future__ import annotations

from datetime import timedelta
from typing import ClassVar, Literal

from pydantic import Field

from tasks.parameters import FlowParameters
from tasks.prefect_api import DeploymentName

UnknownStateAction = Literal["crash", "fail", "cancel", "delete"]


class ReconcileParameters(FlowParameters):
    """One reconcile pass: a threshold per rule, what to do with Unknown runs, a cap, a scope."""

    described_as: ClassVar[str] = "reconcile parameters"

    dry_run: bool = False
    # Prefect's own cancellation cleanup gives a Cancelling run 5 minutes; a worker that
    # is alive answers well within 15.
    cancelling_after_minutes: float = Field(default=15.0, gt=0)
    # Long enough for a worker to pull an image and start a pod.
    pending_after_minutes: float = Field(default=60.0, gt=0)
    # Five missed heartbeats at Prefect's default interval (180 s). Also how long a subflow
    # under a finished parent, or a task run inside a finished flow run, may stay silent.
    zombie_after_minutes: float = Field(default=15.0, gt=0)
    max_runtime_hours: float | None = Field(default=None, gt=0)
    late_after_hours: float | None = Field(default=None, gt=0)
    unknown_state_action: UnknownStateAction = "crash"
    max_actions: int = Field(default=1000, ge=1)
    # Resolved (and an unknown name refused) before the pass.
    deployment_names: tuple[DeploymentName, ...] = ()
    flow_names: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    work_queue_names: tuple[str, ...] = ()

    def threshold(self, parameter: str) -> timedelta | None:
        """The duration a threshold parameter names (`..._minutes` or `..._hours`), None when off."""
        value = getattr(self, parameter)
        if value is None:
            return None
        unit = "hours" if parameter.endswith("_hours") else "minutes"
        return timedelta(**{unit: value})
