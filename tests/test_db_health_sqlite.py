"""The db-health-report flow on a SQLite-backed Prefect server, Prefect's default backend."""

from __future__ import annotations

import sqlite3

import pytest
from prefect.logging.handlers import APILogHandler
from sqlalchemy.engine import make_url

from flows.db_health import db_health_report
from tasks.health.sqlite import NOT_APPLICABLE


def sqlite_path(server) -> str:
    return make_url(server.database_url).database


# A SQLite-backed server needs no PostgreSQL.
@pytest.mark.no_stack
async def test_sqlite_report_measures_the_file_and_says_what_does_not_apply(on_sqlite_server):
    # Free pages, as a purge leaves them: a scratch table of about 4 MB, dropped.
    with sqlite3.connect(sqlite_path(on_sqlite_server), timeout=30) as database:
        database.execute("CREATE TABLE health_scratch (payload TEXT)")
        database.executemany("INSERT INTO health_scratch VALUES (?)", [("x" * 1000,)] * 4000)
        database.commit()
        database.execute("DROP TABLE health_scratch")
        database.commit()
        page_size, page_count, freelist = (
            database.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("page_size", "page_count", "freelist_count")
        )

    report = await db_health_report(top_n=5)
    # Its logs reach the server before the session stops it.
    await APILogHandler.aflush()

    assert report.backend == "sqlite"
    assert report.database == "sqlite database"
    assert report.database_bytes >= page_size * page_count
    free = {flag.object: flag for flag in report.flags if flag.check == "sqlite_free_pages"}["database file"]
    assert free.severity == "warning"
    assert free.value == pytest.approx(100.0 * freelist / page_count, abs=5)
    assert "VACUUM;" in free.advice

    tables = {table.name: table for table in report.tables}
    assert tables["flow_run"].bloat_method == "dbstat" and tables["flow_run"].heap_bytes > 0
    assert tables["flow_run"].index_bytes > 0 and tables["flow_run"].live_rows is not None
    assert {"events", "log", "flow_run", "task_run"} <= {
        table.name for table in report.tables if table.prefect_table
    }

    assert NOT_APPLICABLE in report.notes
    postgres_only = {"connections", "locks", "wraparound", "dead_tuples", "blocked_queries", "autovacuum_off"}
    assert not postgres_only & set(report.findings)
    assert {"expired_runs", "stuck_runs", "events_per_day", "prefect_vacuum_settings"} <= set(report.findings)
    assert not [note for note in report.notes if "could not run" in note]
