"""Count rows whose owner is gone, in every table a deleted flow run leaves rows in.

For tests and benchmarks: after a purge, each of these counts must be zero. The queries
scan whole tables, which is fine on test databases and exactly what the maintenance flows
themselves never do.
"""

from __future__ import annotations

from sqlalchemy import text

from tasks.database import connect

ORPHAN_QUERIES = {
    "log": "SELECT count(*) FROM log l WHERE l.flow_run_id IS NOT NULL "
    "AND NOT EXISTS (SELECT 1 FROM flow_run f WHERE f.id = l.flow_run_id)",
    "artifact": "SELECT count(*) FROM artifact a WHERE a.flow_run_id IS NOT NULL "
    "AND NOT EXISTS (SELECT 1 FROM flow_run f WHERE f.id = a.flow_run_id)",
    "artifact_collection": "SELECT count(*) FROM artifact_collection c "
    "WHERE NOT EXISTS (SELECT 1 FROM artifact a WHERE a.id = c.latest_id)",
    "task_run_state_cache": "SELECT count(*) FROM task_run_state_cache c "
    "WHERE NOT EXISTS (SELECT 1 FROM task_run_state s WHERE s.id = c.task_run_state_id)",
    "task_run": "SELECT count(*) FROM task_run t "
    "WHERE NOT EXISTS (SELECT 1 FROM flow_run f WHERE f.id = t.flow_run_id)",
}


async def count_orphans(database_url: str | None = None) -> dict[str, int]:
    """Orphaned rows per table, in the database of `database_url` (default: the settings')."""
    async with connect(database_url) as connection:
        return {
            table: (await connection.execute(text(sql))).scalar_one() for table, sql in ORPHAN_QUERIES.items()
        }
