"""The one way this project talks to a database: async SQLAlchemy engines.

Every connection carries `statement_timeout`, `lock_timeout` and an `application_name`
so that a DBA can see (and the health report can recognise) maintenance sessions, and so
that maintenance never waits behind a user's lock for long. Read-only sessions (health
report, detectors) also set `default_transaction_read_only`.

Errors raised from here never contain the URL or the password.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pydantic import SecretStr
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from tasks.settings import (
    DatabaseUrlError,
    SettingsError,
    describe_database_url,
    get_settings,
    parse_database_url,
)

APPLICATION_NAME = "prefect-maintenance"


class DatabaseUnavailable(RuntimeError):
    """The configured database could not be reached; the message names no secret."""


def dialect_of(url: str | SecretStr) -> str:
    raw = url.get_secret_value() if isinstance(url, SecretStr) else url
    return parse_database_url(raw)[0]


def create_engine(
    url: str | SecretStr,
    *,
    read_only: bool = False,
    statement_timeout_seconds: float | None = None,
    lock_timeout_seconds: float | None = None,
    pool_size: int = 2,
) -> AsyncEngine:
    """An engine for `url` with the maintenance session settings applied."""
    settings = get_settings()
    raw = url.get_secret_value() if isinstance(url, SecretStr) else url
    dialect, _ = parse_database_url(raw)
    try:
        parsed = make_url(raw)
    except Exception:
        raise DatabaseUrlError("the database URL could not be parsed") from None
    statement_ms = int(1000 * (statement_timeout_seconds or settings.statement_timeout_seconds))
    lock_ms = int(1000 * (lock_timeout_seconds or settings.lock_timeout_seconds))
    if dialect == "sqlite":
        if parsed.drivername == "sqlite":
            parsed = parsed.set(drivername="sqlite+aiosqlite")
        engine = create_async_engine(parsed, connect_args={"timeout": lock_ms / 1000})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # pragma: no cover - driver hook
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys = ON")
            if read_only:
                cursor.execute("PRAGMA query_only = ON")
            cursor.close()

        return engine
    if parsed.drivername in ("postgresql", "postgresql+psycopg2", "postgresql+psycopg"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    server_settings = {
        "application_name": APPLICATION_NAME,
        "statement_timeout": str(statement_ms),
        "lock_timeout": str(lock_ms),
        "idle_in_transaction_session_timeout": str(max(statement_ms, 60_000)),
    }
    if read_only:
        server_settings["default_transaction_read_only"] = "on"
    return create_async_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=2,
        pool_pre_ping=True,
        connect_args={"server_settings": server_settings, "timeout": 10},
    )


@asynccontextmanager
async def connect(
    url: str | SecretStr | None = None, *, read_only: bool = False, **engine_options
) -> AsyncIterator[AsyncConnection]:
    """One connection from a short-lived engine; raises `DatabaseUnavailable` cleanly."""
    if url is None:
        url = get_settings().database_url
    if url is None:
        raise DatabaseUnavailable("no database URL is configured (MAINTENANCE_DATABASE_URL)")
    engine = create_engine(url, read_only=read_only, **engine_options)
    try:
        try:
            connection = await engine.connect()
        except Exception as error:
            raise DatabaseUnavailable(
                f"could not connect to the {describe_database_url(url)}: {describe_error(error, url)}"
            ) from None
        try:
            yield connection
        finally:
            await connection.close()
    finally:
        await engine.dispose()


async def is_reachable(url: str | SecretStr | None) -> bool:
    """True when a connection can be opened and answers `SELECT 1`."""
    if url is None:
        return False
    try:
        async with connect(url) as connection:
            await connection.execute(text("SELECT 1"))
        return True
    except (DatabaseUnavailable, SettingsError):
        return False


def describe_error(error: BaseException, url: str | SecretStr | None = None) -> str:
    """`Type: first line` of the error, with anything from the database URL (by default the
    configured one) that looks secret removed: safe for logs, reports and exceptions."""
    if url is None:
        url = get_settings().database_url
    message = str(getattr(error, "orig", None) or error).splitlines()[0] if str(error) else ""
    if url is not None:
        raw = url.get_secret_value() if isinstance(url, SecretStr) else url
        message = message.replace(raw, "<database url>")
        try:
            password = make_url(raw).password
        except Exception:
            password = None
        if password:
            message = message.replace(str(password), "***")
    return f"{type(error).__name__}: {message[:300]}"
