"""What a Prefect server's own settings (`GET /api/admin/settings`) say about its cleanup.

The settings' shape changed across Prefect 3 versions, so everything here reads what the
answer contains, and a key it lacks means "not known on this server", never an error:
- `server.events.retention_period` is the event retention in every version;
- who trims events follows from `server.services.db_vacuum`: where its `enabled` is a list
  of what it cleans (3.6.21 on), db_vacuum trims them when the list holds `events`, every
  `loop_seconds`; where `db_vacuum` is missing (before 3.6.19) or its `enabled` is a plain
  on/off switch for flow runs (3.6.19 and 3.6.20), the event persister trims them every
  15 minutes when `server.services.event_persister.enabled`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import TypeAdapter

from tasks.health.framework import with_unit

NOT_KNOWN = "not known on this server"

# The event persister's trim interval, fixed in its code (`trim_every`), not a setting.
EVENT_PERSISTER_TRIM_INTERVAL = timedelta(minutes=15)

_durations = TypeAdapter(timedelta)


def setting(settings: dict[str, Any], path: str) -> Any | None:
    """The value at the dotted `path`, or None when this server's settings do not have it."""
    found, value = _lookup(settings, path)
    return value if found else None


def _lookup(settings: dict[str, Any], path: str) -> tuple[bool, Any]:
    """(True, value) when the dotted `path` exists (its value may be null), else (False, None)."""
    value: Any = settings
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return False, None
        value = value[key]
    return True, value


def duration(value: Any) -> timedelta | None:
    return None if value is None else _durations.validate_python(value)


def days(value: Any) -> str:
    """'7 days', '12 hours', or NOT_KNOWN for a missing value."""
    period = duration(value)
    if period is None:
        return NOT_KNOWN
    seconds = period.total_seconds()
    return with_unit(seconds / 86400, "day") if seconds >= 86400 else with_unit(seconds / 3600, "hour")


@dataclass(frozen=True)
class EventTrimming:
    """Which of the server's services trims events, whether it is on, and how often it runs."""

    service: str
    enabled: bool | None
    interval: timedelta | None
    switch: str  # the environment variable that turns it on

    @property
    def advice(self) -> str:
        if self.service == "db_vacuum":
            return (
                "Keep 'events' in PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED with "
                "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED=true on one server"
            )
        return f"Set {self.switch}=true on one server (this Prefect trims events in its event persister)"


def event_trimming(settings: dict[str, Any]) -> EventTrimming:
    vacuum_enabled = setting(settings, "server.services.db_vacuum.enabled")
    if isinstance(vacuum_enabled, list):
        return EventTrimming(
            service="db_vacuum",
            enabled="events" in vacuum_enabled,
            interval=duration(setting(settings, "server.services.db_vacuum.loop_seconds")),
            switch="PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED",
        )
    return EventTrimming(
        service="event_persister",
        enabled=setting(settings, "server.services.event_persister.enabled"),
        interval=EVENT_PERSISTER_TRIM_INTERVAL,
        switch="PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED",
    )


def run_vacuum(settings: dict[str, Any]) -> str:
    """One sentence: whether Prefect's db_vacuum deletes runs on this server, and past which age."""
    enabled = setting(settings, "server.services.db_vacuum.enabled")
    retention = days(setting(settings, "server.services.db_vacuum.retention_period"))
    if enabled is None:
        return "this server has no db_vacuum service: Prefect itself never deletes runs here."
    # A plain switch (3.6.19, 3.6.20) turns on the flow-run vacuum; a list names what it cleans.
    if enabled is True or (isinstance(enabled, list) and "flow_runs" in enabled):
        return f"Prefect's db_vacuum service also deletes top-level runs older than {retention}."
    return "Prefect's own db_vacuum service does not delete runs on this server."


def _listed(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(sorted(str(item) for item in value)) or "(none)"
    return str(value)


def _overrides(value: Any) -> str:
    return ", ".join(f"{name}: {days(period)}" for name, period in value.items()) or "(none)"


@dataclass(frozen=True)
class ListedSetting:
    """A cleanup-related setting the report lists: its variable, where it sits, how it reads."""

    variable: str
    path: str
    shown: Callable[[Any], str] = str


LISTED_SETTINGS = (
    ListedSetting("PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED", "server.services.db_vacuum.enabled", _listed),
    ListedSetting(
        "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD",
        "server.services.db_vacuum.retention_period",
        days,
    ),
    ListedSetting(
        "PREFECT_SERVER_SERVICES_DB_VACUUM_EVENT_RETENTION_OVERRIDES",
        "server.services.db_vacuum.event_retention_overrides",
        _overrides,
    ),
    ListedSetting("PREFECT_SERVER_EVENTS_RETENTION_PERIOD", "server.events.retention_period", days),
    ListedSetting(
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED", "server.services.event_persister.enabled"
    ),
    ListedSetting(
        "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED", "server.services.cancellation_cleanup.enabled"
    ),
    ListedSetting("PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED", "server.services.late_runs.enabled"),
    ListedSetting("PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE", "server.database.sqlalchemy.pool_size"),
    ListedSetting(
        "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW", "server.database.sqlalchemy.max_overflow"
    ),
)


def listed_settings(settings: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for listed in LISTED_SETTINGS:
        found, value = _lookup(settings, listed.path)
        shown = NOT_KNOWN if not found else "None" if value is None else listed.shown(value)
        rows.append({"object": listed.variable, "value": shown})
    return rows
