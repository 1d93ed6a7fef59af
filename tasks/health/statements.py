"""Running one read-only statement; shared by the PostgreSQL and SQLite parts of the report."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


async def rows_of(
    connection: AsyncConnection, statement: str, parameters: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The rows of `statement` as dicts; only the parameters it names are bound."""
    bound = {key: value for key, value in (parameters or {}).items() if f":{key}" in statement}
    result = await connection.execute(text(statement), bound)
    return [dict(row) for row in result.mappings()]
