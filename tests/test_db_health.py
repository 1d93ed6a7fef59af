"""The db-health-report flow on a real PostgreSQL with known ground truth.

A table made 60% dead with autovacuum off, a session left idle inside a transaction and a
query it blocks, a read-only role, a messy Prefect history: the report must see each of
them, say so with the right pids and figures, and never write or leak a secret.
"""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from conftest import use_server
from history import database_of, flags_of
from prefect.logging.handlers import APILogHandler
from sqlalchemy import text

from deploy import PROJECT_ROOT
from flows.db_health import db_health_report
from flows.retention import retention
from localstack.seed import seed_messy_history
from tasks.database import connect
from tasks.health.framework import with_unit
from tasks.health.models import HealthReport
from tasks.prefect_api import call, prefect_client
from tasks.reports import human_bytes

PASSWORD = "Health-Secret-9d7c1"
ROLES_SQL = PROJECT_ROOT / "docker" / "roles.sql"
BLOAT_TABLE = "health_probe_bloat"
LOCK_TABLE = "health_probe_lock"


@pytest.fixture(scope="module")
def psql(stack, module_server):
    def run(sql: str) -> str:
        return stack.postgres.psql(sql, database=database_of(module_server))

    return run


@pytest.fixture(scope="module")
def bloated_table(psql) -> str:
    """200,000 rows, 60% deleted, autovacuum off, analyzed: 60% dead and never vacuumed."""
    psql("CREATE EXTENSION IF NOT EXISTS pgstattuple")
    psql(
        f"CREATE TABLE {BLOAT_TABLE} (id bigint PRIMARY KEY, flow_run_id uuid, level int, message text, "
        "created timestamptz) WITH (autovacuum_enabled = false)"
    )
    psql(
        f"INSERT INTO {BLOAT_TABLE} SELECT g, gen_random_uuid(), g % 50, repeat(md5(g::text), 2), now() "
        "FROM generate_series(1, 200000) AS g"
    )
    psql(f"DELETE FROM {BLOAT_TABLE} WHERE id % 5 < 3")
    psql(f"ANALYZE {BLOAT_TABLE}")
    return BLOAT_TABLE


def pgstattuple_bloat_percent(psql, table: str) -> float:
    """The ground truth: full pgstattuple's live bytes, on the report's scale (wasted space as a
    share of the pages the live rows and their line pointers need)."""
    table_len, tuple_count, tuple_len = (
        int(value)
        for value in psql(f"SELECT table_len, tuple_count, tuple_len FROM pgstattuple('{table}')").split("|")
    )
    needed = math.ceil((tuple_len + 4 * tuple_count) / (8192 - 24)) * 8192
    return 100.0 * (table_len - needed) / needed


async def run_report(**parameters) -> tuple[HealthReport, str]:
    state = await run_flow(**parameters)
    return await state.aresult(), str(state.state_details.flow_run_id)


async def run_flow(**parameters):
    """The flow's final state, once its logs are on the server (which a later fixture stops)."""
    state = await db_health_report(**parameters, return_state=True)
    await APILogHandler.aflush()
    return state


def table_named(report: HealthReport, name: str):
    return next(table for table in report.tables if table.name == name)


async def artifacts_of(flow_run_id: str) -> dict[str, dict]:
    async with prefect_client() as client:
        rows = await call(
            client, "POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        )
    return {row["key"]: row for row in rows if row["key"]}


async def logs_of(flow_run_id: str) -> str:
    """The run's log messages, once the final one has reached the server."""
    async with prefect_client() as client:
        for _ in range(100):
            rows = await call(
                client, "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}}
            )
            messages = "\n".join(row["message"] for row in rows)
            if "Verdict" in messages:
                return messages
            await asyncio.sleep(0.2)
    raise AssertionError("the flow run's logs never reached the server")


async def test_sixty_percent_dead_table_exact_within_5_points_estimate_within_20(
    on_module_server, psql, bloated_table
):
    # Statistics began minutes ago: only a zero-hour staleness threshold sees the table as stale.
    report, flow_run_id = await run_report(exact=True, top_n=5, thresholds={"autovacuum_stale_hours": 0})

    truth = pgstattuple_bloat_percent(psql, bloated_table)
    assert 140 < truth < 170, "60% of the rows dead: the table is about 2.5 times what it needs"
    table = table_named(report, bloated_table)
    assert table.bloat_method == "pgstattuple_approx"
    assert abs(table.bloat_percent - truth) <= 5
    assert abs(table.estimated_bloat_percent - truth) <= 20
    assert table.dead_percent == pytest.approx(60, abs=1)
    assert table.bloat_bytes > 14 * 1024 * 1024
    assert not table.autovacuum_enabled and table.vacuum_due

    assert report.backend == "postgresql" and report.verdict == "critical"
    # No table smaller than minimum_megabytes is flagged for bloat, dead rows or vacuum:
    # on such a table they cost nothing and the statistics are noise.
    small = {table.name for table in report.tables if table.total_bytes < 10 * 1024 * 1024}
    size_checks = {"table_bloat", "dead_tuples", "autovacuum_stale", "autovacuum_due"}
    assert not [flag for flag in report.flags if flag.check in size_checks and flag.object in small]
    bloat_flag = flags_of(report, "table_bloat")[bloated_table]
    assert (bloat_flag.severity, bloat_flag.threshold) == ("critical", 100)
    # Every value says what it is, with its unit.
    assert bloat_flag.shown == f"{with_unit(bloat_flag.value, '%')} bloat"
    assert (
        flags_of(report, "dead_tuples")[bloated_table].shown
        == f"{with_unit(table.dead_percent, '%')} dead rows"
    )
    assert flags_of(report, "autovacuum_stale")[bloated_table].shown.endswith("h since a vacuum")
    # With exact, pgstattuple_approx counts the dead rows: 120,000 of the 200,000 were deleted.
    assert (table.rows_method, table.dead_rows, table.dead_rows_exact) == (
        "pgstattuple_approx",
        120_000,
        True,
    )
    assert f"VACUUM (ANALYZE) {bloated_table};" in bloat_flag.advice
    assert flags_of(report, "dead_tuples")[bloated_table].severity == "warning"
    assert f"ALTER TABLE {bloated_table} RESET (autovacuum_enabled);" in (
        flags_of(report, "autovacuum_disabled")[bloated_table].advice
    )
    assert "Last vacuum: never" in flags_of(report, "autovacuum_stale")[bloated_table].advice
    assert not [note for note in report.notes if "could not run" in note or "did not finish" in note]

    # The UI shows the verdict first, then the flags, then the size chart, then the details.
    markdown = (await artifacts_of(flow_run_id))["db-health-report"]["data"]
    # Words, not colour emoji: it reads the same without an emoji font.
    assert markdown.startswith("# Database health: CRITICAL")
    positions = [
        markdown.index(heading) for heading in ("## Flags", "## Size by table", "## Tables", "## Indexes")
    ]
    assert positions == sorted(positions)
    flags_section = markdown[positions[0] : positions[1]]
    assert f"| **CRITICAL** | table_bloat | {bloated_table} | {bloat_flag.shown} | 100% |" in flags_section
    card = (await artifacts_of(flow_run_id))["db-health-report"]["description"]
    assert card.startswith("CRITICAL · ") and " critical · " in card
    # One progress artifact, on the flow run as the other flows have theirs, run to the end.
    async with prefect_client() as client:
        every = await call(
            client, "POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        )
    progress = [artifact for artifact in every if artifact["type"] == "progress"]
    assert [(artifact["task_run_id"], artifact["data"]) for artifact in progress] == [(None, 100.0)]


async def test_a_small_table_is_counted_exactly_whatever_the_statistics_say(on_module_server, psql):
    # 24 live rows and 10 dead ones; the statistics, reset, say there is nothing at all.
    psql(
        "CREATE TABLE health_probe_small (id int PRIMARY KEY, payload text) WITH (autovacuum_enabled = false); "
        "INSERT INTO health_probe_small SELECT g, md5(g::text) FROM generate_series(1, 34) AS g; "
        "DELETE FROM health_probe_small WHERE id > 24"
    )
    psql("SELECT pg_stat_reset_single_table_counters('health_probe_small'::regclass)")
    # And a table above minimum_megabytes (10 MB), which stays on its statistics.
    psql(
        "CREATE TABLE IF NOT EXISTS health_probe_large AS "
        "SELECT g AS id, repeat(md5(g::text), 4) AS payload FROM generate_series(1, 80000) AS g; "
        "ANALYZE health_probe_large"
    )
    counted = int(psql("SELECT count(*) FROM health_probe_small"))
    assert counted == 24

    # Without pgstattuple, count(*) counts the live rows; the dead ones stay an estimate.
    psql("DROP EXTENSION IF EXISTS pgstattuple")
    try:
        report, flow_run_id = await run_report(top_n=200)
    finally:
        psql("CREATE EXTENSION IF NOT EXISTS pgstattuple")
    small = table_named(report, "health_probe_small")
    assert (small.live_rows, small.rows_method, small.live_rows_exact, small.dead_rows_exact) == (
        counted,
        "count",
        True,
        False,
    )
    markdown = (await artifacts_of(flow_run_id))["db-health-report"]["data"]
    assert "| health_probe_small | 24 | ~0 | ~0% | count(*) |" in markdown
    assert "A figure marked ~ is an estimate, any other is exact." in markdown
    assert "count(*): tables under 10 MB (minimum_megabytes)" in markdown

    # With pgstattuple, both are counted.
    report, flow_run_id = await run_report(top_n=200)
    small = table_named(report, "health_probe_small")
    dead = int(psql("SELECT dead_tuple_count FROM pgstattuple('health_probe_small')"))
    assert (small.live_rows, small.dead_rows, small.rows_method, dead) == (counted, 10, "pgstattuple", 10)
    assert (small.bloat_method, small.dead_percent) == ("pgstattuple", round(100 * 10 / 34, 1))
    markdown = (await artifacts_of(flow_run_id))["db-health-report"]["data"]
    assert f"| health_probe_small | 24 | 10 | {small.dead_percent:g}% | pgstattuple |" in markdown
    # A big table stays an estimate unless exact asks for pgstattuple_approx.
    large = table_named(report, "health_probe_large")
    assert large.total_bytes >= 10 * 1024 * 1024
    assert large.rows_method == "statistics"


async def test_idle_transaction_and_the_query_it_blocks_are_flagged_with_their_pids(on_module_server, psql):
    psql(f"CREATE TABLE {LOCK_TABLE} (id int PRIMARY KEY, value int); INSERT INTO {LOCK_TABLE} VALUES (1, 0)")
    waiter_pid: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def blocked_update() -> None:
        async with connect(lock_timeout_seconds=120, statement_timeout_seconds=120) as waiter:
            waiter_pid.set_result((await waiter.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            await waiter.execute(text(f"UPDATE {LOCK_TABLE} SET value = value + 1 WHERE id = 1"))
            await waiter.rollback()

    async with connect() as holder:
        holder_pid = (await holder.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await holder.execute(text(f"UPDATE {LOCK_TABLE} SET value = value + 1 WHERE id = 1"))
        waiting = asyncio.create_task(blocked_update())
        pid = await waiter_pid
        while psql(f"SELECT wait_event_type FROM pg_stat_activity WHERE pid = {pid}").strip() != "Lock":
            await asyncio.sleep(0.1)

        with_defaults, _ = await run_report()
        overridden, _ = await run_report(
            thresholds={
                "idle_in_transaction_seconds": 0,
                "blocked_query_seconds": 0,
                "long_transaction_seconds": 0,
                "connections_percent": 1,
            }
        )
        await holder.rollback()
        await waiting

    # Seconds-old sessions are below the default thresholds (5 minutes idle, 60 s blocked).
    assert not flags_of(with_defaults, "idle_in_transaction") and not flags_of(
        with_defaults, "blocked_queries"
    )
    assert not flags_of(with_defaults, "connections")
    assert f"pid {holder_pid}" in {row["object"] for row in with_defaults.findings["idle_in_transaction"]}

    idle = flags_of(overridden, "idle_in_transaction")[f"pid {holder_pid}"]
    assert idle.severity == "warning" and f"pg_terminate_backend({holder_pid})" in idle.advice
    assert "UPDATE health_probe_lock" in idle.advice
    blocked = flags_of(overridden, "blocked_queries")[f"pid {pid}"]
    assert f"waits for pid {holder_pid}" in blocked.advice
    assert f"pg_terminate_backend({holder_pid})" in blocked.advice
    assert f"pid {pid}" in flags_of(overridden, "long_transactions")
    assert sum(row["waiting"] for row in overridden.findings["locks"]) >= 1
    connections = flags_of(overridden, "connections")["max_connections"]
    assert (connections.severity, connections.threshold) == ("warning", 1)


async def test_a_deadlock_is_flagged_once_then_counted_as_old(on_module_server, psql):
    psql(
        "CREATE TABLE health_probe_deadlock (id int PRIMARY KEY, value int); "
        "INSERT INTO health_probe_deadlock VALUES (1, 0), (2, 0)"
    )
    await run_report()

    # Two sessions take the same two rows in opposite orders: PostgreSQL ends one of them.
    async with connect(lock_timeout_seconds=60) as first, connect(lock_timeout_seconds=60) as second:
        await first.execute(text("UPDATE health_probe_deadlock SET value = 1 WHERE id = 1"))
        await second.execute(text("UPDATE health_probe_deadlock SET value = 1 WHERE id = 2"))
        outcomes = await asyncio.gather(
            first.execute(text("UPDATE health_probe_deadlock SET value = 1 WHERE id = 2")),
            second.execute(text("UPDATE health_probe_deadlock SET value = 1 WHERE id = 1")),
            return_exceptions=True,
        )
        assert sum("deadlock detected" in str(outcome) for outcome in outcomes) == 1
        await first.rollback()
        await second.rollback()

    after_deadlock, _ = await run_report()
    deadlock = flags_of(after_deadlock, "deadlocks")[database_of(on_module_server)]
    assert (deadlock.severity, deadlock.value) == ("warning", 1)
    assert "since the previous report" in deadlock.advice and "one worker per queue" in deadlock.advice
    next_day, _ = await run_report()
    assert not flags_of(next_day, "deadlocks")
    assert next_day.deadlocks == after_deadlock.deadlocks >= 1


async def test_report_as_the_read_only_report_role_never_writes_and_never_leaks(
    stack, module_server, psql, bloated_table
):
    # The role a deployment gives the report: docker/roles.sql's maintenance_report.
    database = database_of(module_server)
    stack.postgres.psql_file(
        ROLES_SQL, database, {"MAINTENANCE_PURGE_PASSWORD": "unused", "MAINTENANCE_REPORT_PASSWORD": PASSWORD}
    )
    role = "maintenance_report"
    assert psql(f"SELECT has_table_privilege('{role}', 'flow_run', 'INSERT, UPDATE, DELETE')").strip() == "f"
    socket_dir = stack.postgres.socket_dir
    reader_url = f"postgresql+asyncpg://{role}:{PASSWORD}@/{database}?host={socket_dir}"
    writes = (
        f"SELECT n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables WHERE relname = '{bloated_table}'"
    )
    writes_before = psql(writes)

    with use_server(module_server.api_url, reader_url):
        report, flow_run_id = await run_report(exact=True, top_n=3)
        artifacts = await artifacts_of(flow_run_id)
        logs = await logs_of(flow_run_id)

    assert not [note for note in report.notes if "could not run" in note or "did not finish" in note]
    # The role may not read the probe table's columns, so there is no estimate; pgstattuple
    # (pg_monitor) still measures it.
    probe = table_named(report, bloated_table)
    assert (probe.bloat_method, probe.estimated_bloat_percent) == ("pgstattuple_approx", None)
    assert flags_of(report, "table_bloat")[bloated_table].severity == "critical"
    assert psql(writes) == writes_before
    everything = "\n".join(
        [report.model_dump_json(), logs, json.dumps([artifact["data"] for artifact in artifacts.values()])]
        + [artifact["description"] or "" for artifact in artifacts.values()]
    )
    assert {"db-health-report", "db-health-report-tables"} <= set(artifacts)
    for secret in (PASSWORD, reader_url, socket_dir):
        assert secret not in everything

    unreachable_url = (
        f"postgresql+asyncpg://{role}:{PASSWORD}@/{database_of(module_server)}?host=/nonexistent"
    )
    with use_server(module_server.api_url, unreachable_url):
        unreachable, flow_run_id = await run_report()
        artifacts = await artifacts_of(flow_run_id)
    assert [flag.check for flag in unreachable.flags] == ["database_reachable"]
    assert unreachable.verdict == "warning"
    shown = unreachable.model_dump_json() + artifacts["db-health-report"]["data"]
    assert PASSWORD not in shown and unreachable_url not in shown


async def test_unknown_threshold_fails_the_run_before_anything_is_read(on_module_server):
    state = await run_flow(thresholds={"tabel_bloat_percent": 30})
    assert state.is_failed()
    assert "thresholds.tabel_bloat_percent: unknown threshold" in state.message
    assert not await artifacts_of(str(state.state_details.flow_run_id))


async def test_growth_since_the_previous_report(on_module_server, psql):
    psql("CREATE TABLE health_probe_growth (id bigint, payload text)")
    await run_report(top_n=50)
    psql("INSERT INTO health_probe_growth SELECT g, repeat('x', 500) FROM generate_series(1, 20000) AS g")
    report, flow_run_id = await run_report(top_n=50)

    growing = table_named(report, "health_probe_growth")
    assert growing.growth_bytes >= 10 * 1024 * 1024
    assert report.previous_report_at is not None
    markdown = (await artifacts_of(flow_run_id))["db-health-report"]["data"]
    assert "since the previous report" in markdown
    assert any(line.startswith("health_probe_growth") and "(+" in line for line in markdown.splitlines())


async def test_messy_prefect_history_shows_up_as_backlog(on_module_server, psql):
    await seed_messy_history(on_module_server.database_url, prefix="health")
    report, _ = await run_report()

    # Top-level runs in a terminal state whose age (end time, else state time, else due time,
    # else creation) is past the default 30 days.
    past_retention = int(
        psql(
            "SELECT count(*) FROM flow_run WHERE parent_task_run_id IS NULL AND state_id IS NOT NULL "
            "AND state_type IN ('COMPLETED', 'FAILED', 'CANCELLED', 'CRASHED') "
            "AND coalesce(end_time, state_timestamp, expected_start_time, created) < now() - interval '30 days'"
        )
    )
    assert past_retention > 0
    expired = report.findings["expired_runs"][0]
    assert expired["value"] == past_retention
    # The space of their rows, as the retention flow's own dry run measures it.
    dry = await retention(dry_run=True, vacuum=False)
    assert expired["space_bytes"] == dry.bytes_total > 0
    (flag,) = flags_of(report, "expired_runs").values()
    assert (
        f"their rows take about {human_bytes(dry.bytes_total)}" in flag.advice and "pg_repack" in flag.advice
    )

    stuck = {row["object"]: row["value"] for row in report.findings["stuck_runs"]}
    assert sum(stuck.values()) > 0
    assert {flag.object for flag in report.flags if flag.check == "stuck_runs"} == {
        rule for rule, count in stuck.items() if count > 0
    }
    settings = {row["object"]: row["value"] for row in report.findings["prefect_vacuum_settings"]}
    assert settings["PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED"] == "events"
    assert settings["PREFECT_SERVER_EVENTS_RETENTION_PERIOD"] == "7 days"
    assert sum(row["value"] for row in report.findings["events_per_day"]) > 0
    big_tables = {table.name for table in report.tables if table.prefect_table}
    assert {"events", "log", "flow_run", "task_run", "flow_run_state", "task_run_state"} <= big_tables
