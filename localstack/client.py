"""Point this process at a Prefect server: its client, and the maintenance settings' database."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.settings import get_settings


@contextmanager
def pointed_at(api_url: str, database_url: str | None) -> Iterator[None]:
    """Inside this block the Prefect client talks to `api_url` and the maintenance settings
    use `database_url` (none: no database access); both are restored after."""
    saved = os.environ.get("MAINTENANCE_DATABASE_URL")
    _set_database_url(database_url)
    try:
        with temporary_settings({PREFECT_API_URL: api_url}):
            yield
    finally:
        _set_database_url(saved)


def _set_database_url(database_url: str | None) -> None:
    if database_url is None:
        os.environ.pop("MAINTENANCE_DATABASE_URL", None)
    else:
        os.environ["MAINTENANCE_DATABASE_URL"] = database_url
    get_settings(refresh=True)
