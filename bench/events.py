"""Events benchmark: our event retention side by side with Prefect's own, and logs at scale.

On one embedded PostgreSQL + Prefect server, a database of N events with their resources
(`bench.event_slices`, kept between runs), each method on its own day-long window of old
events, one after the other:
- `events_engine`: this project's event retention (`SqlHousekeeping.delete_old_events`,
  what the retention flow's `delete-old-events` task runs), as fast as it goes;
- `events_engine_default`: the same through the retention flow at its defaults (asked for
  events only);
- `prefect_event_vacuum`: Prefect's own `db_vacuum` event functions (3.9.1), called
  directly: `vacuum_events_with_retention_overrides` with its heartbeat override, then
  `vacuum_old_events`, with retention periods that select exactly the window;
- `events_ceiling`: the physical reference: one statement per batch of 5,000 events
  deleting their resources and them, no keyset, no checks.
For each: rows/s (events and resource rows) over its wall time, the probe's p99 while it
ran, and for ours and the ceiling the cost of a batch at the start and at the end (the
median of the first and of the last five full batches). Then the same on a 3.4-style
schema: the indexes Prefect added in 3.7 and 3.8 dropped (and built again afterwards).

Logs at scale: the `log` table filled to L lines (ten per flow run), then the logs of
20,000 more runs deleted the way the SQL engine deletes a batch's logs (by `flow_run_id`,
1,000 runs a batch); the same on a table of the same definition 100 times smaller: the
cost of a batch must not grow with the table.

    python -m bench.events --events 10000000 --logs 30000000 --json .local/bench/events.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from prefect.server.services.db_vacuum import vacuum_events_with_retention_overrides, vacuum_old_events
from prefect.settings import temporary_settings
from sqlalchemy.ext.asyncio import AsyncConnection

from bench.baselines import prefect_server_database
from bench.event_slices import (
    EVENT_TABLES,
    KEPT,
    EventWindow,
    count_window,
    drop_indexes,
    ensure_events,
    ensure_logs,
    restore_indexes,
    seed_log_slice,
    table_sizes,
)
from bench.harness import (
    DEFAULT_STATE_DIR,
    Target,
    bench_server,
    benchmark_markdown,
    format_number,
    machine_and_versions,
    ratio,
    report_results,
    show_progress,
)
from bench.probe import PROBE_FLOW, Probe
from bench.slices import settle
from flows.retention import retention
from localstack.stack import PrefectServer
from tasks.database import connect
from tasks.prefect_api import HEARTBEAT_EVENT
from tasks.reports import markdown_table
from tasks.retention.rate_limit import Deadline
from tasks.retention.sql_database import LOG, PrefectDatabase
from tasks.retention.sql_housekeeping import HOUSEKEEPING_BATCH_ROWS, EventRetention, SqlHousekeeping

DATABASE = "bench_events"
DEFAULT_EVENTS = 10_000_000
DEFAULT_LOGS = 30_000_000
DEFAULT_IDLE_SECONDS = 20.0
# The idle window opens this long after the step before it: a sample is counted by when it
# ends, and the one under way as that step finished (610 ms once, after the warm-up flow,
# against an idle p99 of 224 ms without it) would be counted as idle.
IDLE_SETTLE_SECONDS = 5.0
OLD_SCHEMA = "old_schema_"
# The medians of this many batches at the start and at the end are the cost of a batch there.
EDGE_BATCHES = 5
LOG_SLICE_RUNS = 20_000
LOG_BATCH_RUNS = 1_000
SMALL_LOG_TABLE = "bench.log_small"
SMALL_LOG_SHARE = 0.01
# The indexes Prefect 3.7 and 3.8 added (migrations bad1e352c597, 50737cdaee36, 9e9dadc36797,
# d4a7e1c93f52): dropped for the 3.4-style run, built again after it.
INDEXES_OF_3_7_AND_3_8 = (
    "ix_event_resources__occurred",
    "ix_event_resources__event_id",
    "ix_flow_run__deployment_id",
    "ix_flow_run__state_type_coalesce_start_time",
)

log = logging.getLogger("bench.events")


@dataclass
class EventWorkload:
    """Delete every event (and its resources) older than `window.high`: the window, once older ones are gone."""

    window: EventWindow
    database_url: str
    old_schema: bool
    batch_seconds: list[float] = field(default_factory=list)


class TimedDatabase(PrefectDatabase):
    """Prefect's database that records how long each of its transactions took: a batch each."""

    def __init__(self, url: str, batch_seconds: list[float]) -> None:
        super().__init__(url)
        self._batch_seconds = batch_seconds

    @asynccontextmanager
    async def transaction(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        started = time.perf_counter()
        async with super().transaction(write=write) as connection:
            yield connection
        self._batch_seconds.append(time.perf_counter() - started)


async def events_engine(workload: EventWorkload) -> None:
    database = TimedDatabase(workload.database_url, workload.batch_seconds)
    try:
        rules = [EventRetention(older_than=workload.window.high)]
        await SqlHousekeeping(database).delete_old_events(rules, Deadline(None), dry_run=False)
    finally:
        await database.dispose()


async def events_engine_default(workload: EventWorkload) -> None:
    """The retention flow at its defaults (pace included), asked for events only: its runs
    filter selects the probe's flow, none of whose runs is ten years old."""
    days = workload.window.older_than_days()
    await retention(
        older_than_days=3650,
        flow_names=[PROBE_FLOW],
        engine="sql",
        events_older_than_days=days,
        heartbeat_events_older_than_days=days,
        max_minutes=None,
        vacuum=False,
    )


async def warm_up() -> None:
    """One dry run of the flow that finds nothing: Prefect's flow engine pays its one-time
    start-up cost (imports, first client) here, not inside a measurement."""
    await retention(
        older_than_days=3650,
        flow_names=[PROBE_FLOW],
        dry_run=True,
        events_older_than_days=3650,
        heartbeat_events_older_than_days=3650,
    )


async def prefect_event_vacuum(workload: EventWorkload) -> None:
    """As the db_vacuum service runs them: the per-type overrides (heartbeats), then the rest."""
    retention = datetime.now(UTC) - workload.window.high
    settings = {
        "server.events.retention_period": retention,
        "server.services.db_vacuum.event_retention_overrides": {HEARTBEAT_EVENT: retention},
    }
    async with prefect_server_database(workload.database_url) as database:
        with temporary_settings(settings):
            await vacuum_events_with_retention_overrides(db=database)
            await vacuum_old_events(db=database)


# Resources by event id (the 3.8 index); on a 3.4 schema, which has no such index, by the
# batch's resource ids and time span (`ix_event_resources__resource_id__occurred`).
_CEILING_RESOURCES = {
    False: "event_id = ANY(ARRAY(SELECT id FROM batch))",
    True: """
        resource_id = ANY(ARRAY(SELECT resource_id FROM batch
                                UNION SELECT jsonb_array_elements_text(related_resource_ids) FROM batch))
        AND occurred >= (SELECT min(occurred) FROM batch) AND occurred <= (SELECT max(occurred) FROM batch)
        AND event_id = ANY(ARRAY(SELECT id FROM batch))
    """,
}
_CEILING_BATCH = """
WITH batch AS MATERIALIZED (
    SELECT id, occurred, resource_id, related_resource_ids FROM events
    WHERE occurred < :older_than ORDER BY occurred LIMIT :batch_rows
),
resources AS (DELETE FROM event_resources WHERE {resources} RETURNING 1),
deleted AS (DELETE FROM events WHERE id = ANY(ARRAY(SELECT id FROM batch)) RETURNING 1)
SELECT (SELECT count(*) FROM deleted)
"""


async def events_ceiling(workload: EventWorkload) -> None:
    statement = sa.text(_CEILING_BATCH.format(resources=_CEILING_RESOURCES[workload.old_schema]))
    parameters = {"older_than": workload.window.high, "batch_rows": HOUSEKEEPING_BATCH_ROWS}
    async with connect(workload.database_url) as connection:
        while True:
            started = time.perf_counter()
            deleted = (await connection.execute(statement, parameters)).scalar_one()
            await connection.commit()
            workload.batch_seconds.append(time.perf_counter() - started)
            if deleted < HOUSEKEEPING_BATCH_ROWS:
                return


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[[EventWorkload], Awaitable[None]]
    # Its share of N; a 3.4 schema's share is the second number.
    shares: tuple[float, float]


# In the order they run, which is also the order of their windows, oldest first. At N =
# 10,000,000: 300,000 events for each method on today's schema, 100,000 on the 3.4 schema,
# where Prefect's own vacuum has no index for its 200 rows at a time: 20,000 events.
METHODS = (
    Method("prefect_event_vacuum", prefect_event_vacuum, (0.03, 0.002)),
    Method("events_ceiling", events_ceiling, (0.03, 0.01)),
    Method("events_engine", events_engine, (0.03, 0.01)),
    Method("events_engine_default", events_engine_default, (0.03, 0.01)),
)
METHODS_BY_NAME = {method.name: method for method in METHODS}
PHASES = ("", OLD_SCHEMA)
WINDOWS = tuple(phase + method.name for phase in PHASES for method in METHODS)


def _figure(phase: str, key: str) -> Callable[[Mapping[str, Any]], float | None]:
    return lambda results: results.get(phase + key)


def _ratio(phase: str, numerator: str, denominator: str) -> Callable[[Mapping[str, Any]], float | None]:
    return lambda results: ratio(results.get(phase + numerator), results.get(phase + denominator))


def _targets(phase: str) -> tuple[Target, ...]:
    schema = " (3.4 schema)" if phase else ""
    return (
        Target(
            f"events_engine rows/s ≥ 1.5 × prefect_event_vacuum{schema}",
            _ratio(phase, "events_engine_rows_per_s", "prefect_event_vacuum_rows_per_s"),
            1.5,
        ),
        Target(
            f"events_engine rows/s ≥ 0.8 × events_ceiling{schema}",
            _ratio(phase, "events_engine_rows_per_s", "events_ceiling_rows_per_s"),
            0.8,
        ),
        Target(
            f"probe p99 during events_engine_default ≤ 2 × idle{schema}",
            _ratio(phase, "probe_p99_ms_during_events_engine_default", "probe_p99_ms_idle"),
            2.0,
            at_most=True,
        ),
        Target(
            f"events_engine: last batch ≤ 1.5 × first batch{schema}",
            _ratio(phase, "batch_ms_last", "batch_ms_first"),
            1.5,
            at_most=True,
        ),
    )


TARGETS = (
    *_targets(""),
    *_targets(OLD_SCHEMA),
    Target(
        "log batch on the full log table ≤ 2 × on a table 100 × smaller",
        lambda results: ratio(
            results.get("log_batch_ms_first"), results.get("log_small_table_batch_ms_first")
        ),
        2.0,
        at_most=True,
    ),
    Target(
        "log batch: last ≤ 1.5 × first",
        lambda results: ratio(results.get("log_batch_ms_last"), results.get("log_batch_ms_first")),
        1.5,
        at_most=True,
    ),
)


@dataclass(frozen=True)
class Options:
    events: int = DEFAULT_EVENTS
    logs: int = DEFAULT_LOGS
    idle_seconds: float = DEFAULT_IDLE_SECONDS
    log_slice_runs: int = LOG_SLICE_RUNS

    def slice_sizes(self) -> dict[str, int]:
        """Events per method window: its share of N (at least one); the rest of N is kept."""
        sizes = {
            phase + method.name: max(1, round(method.shares[bool(phase)] * self.events))
            for phase in PHASES
            for method in METHODS
        }
        if sum(sizes.values()) >= self.events:
            raise ValueError(
                f"--events {self.events:,} is too few for the methods' windows ({sum(sizes.values()):,})"
            )
        return sizes


def edge_milliseconds(batch_seconds: list[float], full_batches: int) -> tuple[float | None, float | None]:
    """Median milliseconds of the first and of the last `EDGE_BATCHES` of the full batches."""
    full = batch_seconds[:full_batches]
    if not full:
        return None, None
    edge = min(EDGE_BATCHES, len(full))
    first, last = full[:edge], full[-edge:]
    return round(1000 * statistics.median(first), 1), round(1000 * statistics.median(last), 1)


async def measure_method(method: Method, workload: EventWorkload, probe: Probe) -> dict[str, Any]:
    before = await count_window(workload.database_url, workload.window)
    window_start = time.time()
    started = time.perf_counter()
    await method.run(workload)
    seconds = time.perf_counter() - started
    window_end = time.time()
    after = await count_window(workload.database_url, workload.window)
    await settle(workload.database_url, EVENT_TABLES)
    rows_deleted = before.rows - after.rows
    first, last = edge_milliseconds(workload.batch_seconds, before.events // HOUSEKEEPING_BATCH_ROWS)
    return {
        "window_events": before.events,
        "window_event_resources": before.event_resources,
        "events_deleted": before.events - after.events,
        "event_resources_deleted": before.event_resources - after.event_resources,
        "rows_left": after.rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows_deleted / seconds, 1),
        "batches": len(workload.batch_seconds) or None,
        "batch_ms_first": first,
        "batch_ms_last": last,
        "probe": probe.summary(window_start, window_end),
    }


async def idle_probe(probe: Probe, seconds: float) -> dict[str, Any]:
    await asyncio.sleep(IDLE_SETTLE_SECONDS)
    started = time.time()
    await asyncio.sleep(seconds)
    return probe.summary(started, time.time())


async def run_phase(
    phase: str, windows: Mapping[str, EventWindow], database_url: str, probe: Probe, options: Options
) -> dict[str, Any]:
    """Every method on its window at the current schema; the figures under the phase's prefix."""
    results: dict[str, Any] = {}
    idle = await idle_probe(probe, options.idle_seconds)
    log.info("%sprobe on the idle server: p50 %s ms, p99 %s ms", phase, idle["p50_ms"], idle["p99_ms"])
    results[f"{phase}probe_idle"] = idle
    results[f"{phase}probe_p99_ms_idle"] = idle["p99_ms"]
    methods = {}
    for method in METHODS:
        workload = EventWorkload(windows[phase + method.name], database_url, old_schema=bool(phase))
        measured = await measure_method(method, workload, probe)
        log.info(
            "%s%s: %s events and %s resources in %.1f s (%s rows/s), batches %s -> %s ms, probe p99 %s ms",
            phase,
            method.name,
            f"{measured['events_deleted']:,}",
            f"{measured['event_resources_deleted']:,}",
            measured["seconds"],
            f"{measured['rows_per_s']:,.0f}",
            measured["batch_ms_first"],
            measured["batch_ms_last"],
            measured["probe"]["p99_ms"],
        )
        methods[method.name] = measured
        results[f"{phase}{method.name}_rows_per_s"] = measured["rows_per_s"]
        results[f"{phase}probe_p99_ms_during_{method.name}"] = measured["probe"]["p99_ms"]
    results[f"{phase}methods"] = methods
    results[f"{phase}batch_ms_first"] = methods["events_engine"]["batch_ms_first"]
    results[f"{phase}batch_ms_last"] = methods["events_engine"]["batch_ms_last"]
    return results


@contextlib.asynccontextmanager
async def schema_of_3_4(database_url: str) -> AsyncIterator[None]:
    """The indexes of 3.7 and 3.8 dropped inside the block, built again after it."""
    await drop_indexes(database_url, INDEXES_OF_3_7_AND_3_8)
    try:
        yield
    finally:
        await restore_indexes(database_url)


async def measure_log_batches(database_url: str, table: str, runs: int) -> dict[str, Any]:
    """Delete the logs of `runs` flow runs from `table` as the SQL engine deletes a batch's: by
    `flow_run_id = ANY(ids)`, 1,000 runs a transaction; the cost of a batch at the start and end."""
    flow_run_ids = await seed_log_slice(database_url, table, runs)
    await settle(database_url, (table,))
    schema, _, name = table.rpartition(".")
    log_table = LOG if table == LOG.name else LOG.to_metadata(sa.MetaData(), schema=schema, name=name)
    database = PrefectDatabase(database_url)
    batch_seconds, lines = [], 0
    started = time.perf_counter()
    try:
        for first in range(0, len(flow_run_ids), LOG_BATCH_RUNS):
            batch = flow_run_ids[first : first + LOG_BATCH_RUNS]
            batch_started = time.perf_counter()
            async with database.transaction(write=True) as connection:
                deleted = await connection.execute(
                    sa.delete(log_table).where(database.among(log_table.c.flow_run_id, batch))
                )
            batch_seconds.append(time.perf_counter() - batch_started)
            lines += deleted.rowcount
    finally:
        await database.dispose()
    seconds = time.perf_counter() - started
    first_ms, last_ms = edge_milliseconds(batch_seconds, len(batch_seconds))
    return {
        "lines_deleted": lines,
        "seconds": round(seconds, 3),
        "lines_per_s": round(lines / seconds, 1),
        "batches": len(batch_seconds),
        "batch_ms_first": first_ms,
        "batch_ms_last": last_ms,
    }


async def measure_logs(database_url: str, options: Options) -> dict[str, Any]:
    small_lines = max(LOG_BATCH_RUNS * 10, round(SMALL_LOG_SHARE * options.logs))
    lines = await ensure_logs(database_url, LOG.name, options.logs)
    small = await ensure_logs(database_url, SMALL_LOG_TABLE, small_lines)
    results: dict[str, Any] = {"logs": lines, "log_small_table_rows": small}
    for prefix, table in (("log_small_table_", SMALL_LOG_TABLE), ("log_", LOG.name)):
        measured = await measure_log_batches(database_url, table, options.log_slice_runs)
        log.info("logs of %s: %s", table, measured)
        results[f"{prefix}batch_ms_first"] = measured["batch_ms_first"]
        results[f"{prefix}batch_ms_last"] = measured["batch_ms_last"]
        results[f"{prefix}lines_per_s"] = measured["lines_per_s"]
        results[f"{prefix}deletion"] = measured
    return results


async def benchmark(server: PrefectServer, options: Options, samples_file: Path) -> dict[str, Any]:
    """The whole benchmark against `server`, which the client settings already point at."""
    database_url = server.database_url
    sizes = options.slice_sizes()
    kept = options.events - sum(sizes.values())
    results: dict[str, Any] = {
        "benchmark": "events",
        "events": options.events,
        "windows": sizes,
        "kept_events": kept,
        "batch_rows": HOUSEKEEPING_BATCH_ROWS,
        **await machine_and_versions(database_url),
    }
    started = time.perf_counter()
    # What an interrupted run left dropped (for the 3.4-style schema, or for a big load), before
    # the windows are counted by `occurred`.
    await restore_indexes(database_url)
    windows = await ensure_events(database_url, kept, sizes, WINDOWS)
    results["events"] = sum(window.events for window in windows.values())
    results.update(await measure_logs(database_url, options))
    await settle(database_url, EVENT_TABLES)
    results["seed_seconds"] = round(time.perf_counter() - started, 1)
    results["table_sizes"] = await table_sizes(database_url, (*EVENT_TABLES, LOG.name))
    log.info("seeded in %.0f s: %s", results["seed_seconds"], results["table_sizes"])
    kept_before = await count_window(database_url, windows[KEPT])
    probe = Probe(server.api_url, samples_file).start()
    try:
        await probe.sampling()
        await warm_up()
        results.update(await run_phase("", windows, database_url, probe, options))
        async with schema_of_3_4(database_url):
            results.update(await run_phase(OLD_SCHEMA, windows, database_url, probe, options))
    finally:
        probe.stop()
    results["kept_rows_intact"] = await count_window(database_url, windows[KEPT]) == kept_before
    results["targets"] = [target.verdict(results) for target in TARGETS]
    return results


def to_markdown(results: Mapping[str, Any]) -> str:
    rows = []
    for phase, schema in (("", "today's"), (OLD_SCHEMA, "3.4-style")):
        for name, measured in results[f"{phase}methods"].items():
            rows.append(
                (
                    schema,
                    name,
                    format_number(measured["events_deleted"]),
                    format_number(measured["event_resources_deleted"]),
                    format_number(measured["seconds"]),
                    format_number(measured["rows_per_s"]),
                    format_number(measured["batch_ms_first"]),
                    format_number(measured["batch_ms_last"]),
                    format_number(measured["probe"]["p99_ms"]),
                )
            )
        rows.append(
            (schema, "(idle)", "", "", "", "", "", "", format_number(results[f"{phase}probe_p99_ms_idle"]))
        )
    sizes = results["table_sizes"]
    events_table = markdown_table(
        [
            "schema",
            "method",
            "events deleted",
            "resources deleted",
            "seconds",
            "rows/s",
            "batch ms, first",
            "batch ms, last",
            "probe p99 ms",
        ],
        rows,
    )
    logs_table = markdown_table(
        ["log table", "rows", "lines deleted", "lines/s", "batch ms, first", "batch ms, last"],
        [
            (
                table,
                format_number(results[rows_key]),
                format_number(results[f"{prefix}deletion"]["lines_deleted"]),
                format_number(results[f"{prefix}lines_per_s"]),
                format_number(results[f"{prefix}batch_ms_first"]),
                format_number(results[f"{prefix}batch_ms_last"]),
            )
            for table, rows_key, prefix in (
                (SMALL_LOG_TABLE, "log_small_table_rows", "log_small_table_"),
                (LOG.name, "logs", "log_"),
            )
        ],
    )
    on_disk = ", ".join(
        f"{table} {figures['rows_estimated']:,} rows, {figures['gigabytes']:g} GB"
        for table, figures in sizes.items()
    )
    return benchmark_markdown(
        f"Events benchmark: {results['events']:,} events, batches of {results['batch_rows']:,} events",
        events_table,
        results,
        f"Logs at scale, batches of the logs of {LOG_BATCH_RUNS:,} flow runs:\n\n{logs_table}",
        f"Seeded tables (indexes included): {on_disk}. "
        f"Rows of the kept events intact: {'yes' if results['kept_rows_intact'] else 'NO'}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="events in the database (N)")
    parser.add_argument("--logs", type=int, default=DEFAULT_LOGS, help="lines in the log table")
    parser.add_argument("--idle-seconds", type=float, default=DEFAULT_IDLE_SECONDS)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--fresh", action="store_true", help="drop the seeded database and seed it again")
    args = parser.parse_args(argv)
    show_progress()
    options = Options(events=args.events, logs=args.logs, idle_seconds=args.idle_seconds)
    try:
        options.slice_sizes()
    except ValueError as error:
        parser.error(str(error))
    with (
        bench_server(args.state_dir, DATABASE, fresh=args.fresh) as server,
        tempfile.TemporaryDirectory() as scratch,
    ):
        results = asyncio.run(benchmark(server, options, Path(scratch) / "probe-samples.txt"))
    return report_results("bench.events", argv, args.json, results, to_markdown)


if __name__ == "__main__":
    raise SystemExit(main())
