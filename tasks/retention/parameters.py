"""The retention flow's parameters, validated once before anything is read or deleted.

The flow's signature carries the types the Prefect UI needs to render its form; this
model carries the rules (ranges, known names, combinations) in the shape of every flow's
(`tasks.parameters`). A bad value raises `ParameterError` whose message starts with the
parameter's name.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from tasks.parameters import FlowParameters
from tasks.prefect_api import TERMINAL_STATES, DeploymentName, TerminalState
from tasks.retention.archive import check_archive_to

EngineChoice = Literal["auto", "api", "sql"]

# Anything younger could still be a run that is being written; one hour is also the
# floor Prefect's own `db_vacuum` retention setting accepts.
MINIMUM_AGE_DAYS = 1 / 24


class RetentionParameters(FlowParameters):
    """What one retention run should delete, and how fast."""

    described_as: ClassVar[str] = "retention parameters"

    older_than_days: float = 30.0
    states: tuple[TerminalState, ...] = TERMINAL_STATES
    per_state_days: dict[TerminalState, float] = Field(default_factory=dict)
    keep_last_per_deployment: int = Field(default=0, ge=0)
    deployment_names: tuple[DeploymentName, ...] = ()
    flow_names: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    exclude_tags: tuple[str, ...] = ()
    dry_run: bool = False
    engine: EngineChoice = "auto"
    batch_size: int = Field(default=1_000, ge=1, le=10_000)
    max_runs_per_second: float | None = Field(default=None, ge=0)
    max_minutes: float | None = Field(default=60.0, gt=0)
    include_orphans: bool = False
    events_older_than_days: float | None = 7.0
    heartbeat_events_older_than_days: float | None = 1.0
    vacuum: bool = True
    archive_to: str = ""

    @field_validator("older_than_days", "events_older_than_days", "heartbeat_events_older_than_days")
    @classmethod
    def _more_than_an_hour(cls, days: float | None) -> float | None:
        if days is not None and not days > MINIMUM_AGE_DAYS:
            raise ValueError(f"must be more than one hour ({MINIMUM_AGE_DAYS:.4f} days), got {days}")
        return days

    @field_validator("archive_to")
    @classmethod
    def _archive_destination(cls, archive_to: str) -> str:
        return check_archive_to(archive_to)

    @field_validator("per_state_days")
    @classmethod
    def _each_more_than_an_hour(cls, days_per_state: dict[str, float]) -> dict[str, float]:
        for state, days in days_per_state.items():
            if not days > MINIMUM_AGE_DAYS:
                raise ValueError(
                    f"{state} must be more than one hour ({MINIMUM_AGE_DAYS:.4f} days), got {days}"
                )
        return days_per_state

    @field_validator("states")
    @classmethod
    def _some_states(cls, states: tuple[str, ...]) -> tuple[str, ...]:
        if not states:
            raise ValueError("name at least one terminal state")
        return tuple(dict.fromkeys(states))

    def days_for(self, state: str) -> float:
        return self.per_state_days.get(state, self.older_than_days)
