"""The check of a SQLite-backed server's database file: its free pages (the freelist), which
only `VACUUM` (or `auto_vacuum`) gives back to the disk. The page counts are the survey's
(`tasks.health.sqlite`); the per-table bloat of SQLite is the `table_bloat` check's.
"""

from __future__ import annotations

from tasks.health.framework import AboveThreshold, Check, HealthContext, Row
from tasks.reports import human_bytes


async def _free_pages(context: HealthContext) -> list[Row]:
    server = context.server
    percent = round(100.0 * server["freelist_count"] / max(server["page_count"], 1), 1)
    return [
        {
            "object": "database file",
            "value": percent,
            "free": human_bytes(server["freelist_count"] * server["page_size"]),
            "pages": server["page_count"],
        }
    ]


SQLITE_FREE_PAGES = Check(
    "sqlite_free_pages",
    "Free pages in the SQLite file",
    _free_pages,
    AboveThreshold("sqlite_free_percent"),
    "{free} of the file is free pages. VACUUM; rewrites it compactly (stop the Prefect server first; "
    "it needs free disk about the size of the file), or PRAGMA auto_vacuum = INCREMENTAL; "
    "then VACUUM; once, after which PRAGMA incremental_vacuum; frees pages without a rewrite.",
    unit="%",
    shows="{value} of the file free",
    backends=("sqlite",),
)

CHECKS = (SQLITE_FREE_PAGES,)
