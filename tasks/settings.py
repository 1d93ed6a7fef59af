"""Settings for the maintenance flows, read once from the environment.

The database URL is optional: without one (Prefect Cloud, or a server whose database is
not reachable from the worker) every flow works through the Prefect API alone. The URL is
a secret: it is held as a `SecretStr` and only ever shown through `describe_database_url`,
which prints the dialect, host and database name, never the user's password.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SUPPORTED_SCHEMES = ("postgresql", "sqlite")


class SettingsError(ValueError):
    """A setting that cannot be used: the message names the setting, never its value (a
    database URL may hold a password)."""


class DatabaseUrlError(SettingsError):
    """A database URL that cannot be used; its message never contains the URL itself."""


def parse_database_url(url: str) -> tuple[str, str]:
    """Return (dialect, driver) of a SQLAlchemy-style URL, or raise a redacted error."""
    scheme, _, rest = url.partition("://")
    if not scheme or not rest:
        raise DatabaseUrlError(
            "the database URL is not a URL: expected "
            "'postgresql+asyncpg://user:password@host:port/database' or "
            "'sqlite+aiosqlite:///path/to/prefect.db'"
        )
    dialect, _, driver = scheme.partition("+")
    if dialect not in SUPPORTED_SCHEMES:
        raise DatabaseUrlError(
            f"the database URL uses the unsupported dialect {dialect!r}: "
            "use postgresql+asyncpg:// or sqlite+aiosqlite://"
        )
    return dialect, driver


def describe_database_url(url: str | SecretStr | None) -> str:
    """A loggable description of a database URL: dialect, host and database, no secrets."""
    if url is None:
        return "no database configured"
    raw = url.get_secret_value() if isinstance(url, SecretStr) else url
    try:
        dialect, _ = parse_database_url(raw)
    except DatabaseUrlError:
        return "an unparseable database URL"
    if dialect == "sqlite":
        return "sqlite database"
    parts = urlsplit(raw)
    try:
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "postgresql database with an invalid host or port"
    if not host:
        # Unix-socket URLs carry the socket folder in the query string.
        host = parse_qs(parts.query).get("host", ["local socket"])[0]
        host = "unix socket" if host.startswith("/") else host
    database = parts.path.lstrip("/") or "(default database)"
    return f"postgresql database {database!r} on {host}{f':{port}' if port else ''}"


class MaintenanceSettings(BaseSettings):
    """Environment settings. Flow parameters override the defaults per run."""

    model_config = SettingsConfigDict(extra="ignore", env_file=None)

    database_url: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "MAINTENANCE_DATABASE_URL",
            "PREFECT_API_DATABASE_CONNECTION_URL",
            "PREFECT_SERVER_DATABASE_CONNECTION_URL",
        ),
        description="Database for direct access (SQL engine, detectors, health report).",
    )
    statement_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        validation_alias="MAINTENANCE_STATEMENT_TIMEOUT_SECONDS",
        description="statement_timeout for every maintenance transaction.",
    )
    lock_timeout_seconds: float = Field(
        default=2.0,
        gt=0,
        validation_alias="MAINTENANCE_LOCK_TIMEOUT_SECONDS",
        description="lock_timeout for every maintenance transaction.",
    )
    api_concurrency: int = Field(
        default=4,
        ge=1,
        le=32,
        validation_alias="MAINTENANCE_API_CONCURRENCY",
        description="Prefect API calls in flight at once.",
    )
    default_max_runs_per_second: float = Field(
        default=500.0,
        ge=0,
        validation_alias="MAINTENANCE_MAX_RUNS_PER_SECOND",
        description="Default retention rate limit (0 = unlimited).",
    )

    report_database_url: SecretStr | None = Field(
        default=None,
        validation_alias="MAINTENANCE_REPORT_DATABASE_URL",
        description="On the worker: the read-only role's URL that report and reconcile runs use instead.",
    )
    timezone: str = Field(
        default="UTC",
        validation_alias="MAINTENANCE_TIMEZONE",
        description="Read by `make deploy`: the timezone of the deployments' schedules.",
    )
    project_dir: str | None = Field(
        default=None,
        validation_alias="MAINTENANCE_PROJECT_DIR",
        description="On the worker: where the project's code is (default: the folder it runs from).",
    )
    work_pool_type: Literal["process", "kubernetes"] = Field(
        default="process",
        validation_alias="MAINTENANCE_WORK_POOL_TYPE",
        description="Read by `make deploy`: the type of the maintenance work pool it creates.",
    )
    image: str | None = Field(
        default=None,
        validation_alias="MAINTENANCE_IMAGE",
        description="Read by `make deploy` for a kubernetes pool: the project's image its Jobs run.",
    )
    kubernetes_namespace: str = Field(
        default="prefect",
        min_length=1,
        validation_alias="MAINTENANCE_KUBERNETES_NAMESPACE",
        description="Read by `make deploy` for a kubernetes pool: the namespace of its Jobs and Secret.",
    )
    kubernetes_secret: str = Field(
        default="prefect-maintenance",
        min_length=1,
        validation_alias="MAINTENANCE_KUBERNETES_SECRET",
        description="Read by `make deploy` for a kubernetes pool: the Secret its Jobs take their environment from.",
    )

    @field_validator("database_url", "report_database_url", mode="before")
    @classmethod
    def _check_database_url(cls, value: object) -> object:
        if value in (None, ""):
            return None
        raw = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        parse_database_url(raw)
        return raw

    @property
    def database_description(self) -> str:
        return describe_database_url(self.database_url)


@lru_cache(maxsize=1)
def _cached_settings() -> MaintenanceSettings:
    return MaintenanceSettings()


def get_settings(*, refresh: bool = False) -> MaintenanceSettings:
    """The process's settings; `refresh=True` re-reads the environment (tests, CLIs)."""
    if refresh:
        _cached_settings.cache_clear()
    try:
        return _cached_settings()
    except ValueError as error:
        # pydantic's ValidationError repeats the input value: never show it.
        raise SettingsError(_first_message(error)) from None


def _first_message(error: ValueError) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        for item in errors():
            message = str(item.get("msg", ""))
            location = ".".join(str(part) for part in item.get("loc", ()))
            return f"invalid setting {location}: {message}".replace("Value error, ", "")
    return "invalid maintenance settings"
