"""Retention benchmark: our retention flow side by side with Prefect's own ways, in one run.

On one embedded PostgreSQL + Prefect server: bulk-seed N finished runs (each with states,
task runs, logs, an artifact and events), give every method its own slice of them (see
`bench.slices`), then run the methods one after the other. For each: runs/s and rows/s
over its own wall time, the rows it left without their run (logs counted once the
server's background log deletion had up to a minute; then, watching up to five minutes
more, runs/s until those logs are gone), and the p50/p99 latency of a worker's API calls
while it ran, next to the same probe on the idle server.

    python -m bench.retention --runs 100000 --json .local/bench/retention.json

Between methods the owned tables are vacuumed and analysed, so that no method pays for
(or profits from) what the previous one left behind. Our flow runs without its final
VACUUM (`vacuum=False`) and without event retention, which the other methods lack too.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.baselines import (
    DOCS_FLOW_STATES,
    Workload,
    api_bulk_delete,
    api_delete,
    docs_flow,
    prefect_db_vacuum,
    sql_ceiling,
)
from bench.harness import (
    DEFAULT_STATE_DIR,
    Target,
    bench_server,
    benchmark_markdown,
    flush_flow_logs,
    format_number,
    machine_and_versions,
    ratio,
    report_results,
    show_progress,
)
from bench.probe import Probe
from bench.slices import KEPT, OLDER_THAN_DAYS, SliceCount, count_slice, runs_in_states, seed_slices, settle
from flows.retention import retention
from localstack.stack import PrefectServer
from tasks.reports import markdown_table
from tasks.retention.parameters import TERMINAL_STATES

DEFAULT_RUNS = 100_000
DEFAULT_BATCH_SIZE = 500
DEFAULT_IDLE_SECONDS = 20.0
# How long the server may take to delete, in its background queue, the logs of runs
# deleted through the API before they count as left behind.
DEFAULT_LOG_WAIT_SECONDS = 60.0
# Past that, how long to keep watching, to time when the server has deleted them all: a
# method that leaves logs to the server is only done then ("runs/s until its logs are gone").
DEFAULT_LOGS_GONE_WAIT_SECONDS = 300.0
LOG_POLL_SECONDS = 1.0
DATABASE = "bench_retention"

log = logging.getLogger("bench.retention")


async def _our_flow(
    workload: Workload, *, engine: str, max_runs_per_second: float | None, dry_run: bool = False
) -> dict[str, Any]:

    report = await retention(
        older_than_days=workload.older_than_days,
        flow_names=[workload.slice.flow_name],
        engine=engine,
        dry_run=dry_run,
        batch_size=workload.batch_size,
        max_runs_per_second=max_runs_per_second,
        max_minutes=None,
        events_older_than_days=None,
        heartbeat_events_older_than_days=None,
        vacuum=False,
    )
    return {
        "flow_seconds": report.seconds,
        "batches": report.batches,
        "max_runs_per_second": report.max_runs_per_second,
        "slowdowns": report.slowdowns,
    }


async def sql_engine(workload: Workload) -> dict[str, Any]:
    return await _our_flow(workload, engine="sql", max_runs_per_second=0)


async def sql_engine_default(workload: Workload) -> dict[str, Any]:
    """The SQL engine at the worker's default pace (MAINTENANCE_MAX_RUNS_PER_SECOND)."""
    return await _our_flow(workload, engine="sql", max_runs_per_second=None)


async def api_engine(workload: Workload) -> dict[str, Any]:
    return await _our_flow(workload, engine="api", max_runs_per_second=0)


async def warm_up(workload: Workload) -> None:
    """One dry run of our flow on runs it will not select: Prefect's flow engine pays its
    one-time start-up cost (imports, first client) here, not inside the first measurement."""
    await _our_flow(workload, engine="sql", max_runs_per_second=0, dry_run=True)


@dataclass(frozen=True)
class Method:
    """One way to delete old runs, its default share of N, and what it deletes."""

    name: str
    # Returns what the method itself reports, if anything (our flow: its report's figures).
    run: Callable[[Workload], Awaitable[Mapping[str, Any] | None]]
    share: float
    states: tuple[str, ...] = TERMINAL_STATES
    # The server deletes the logs of runs deleted through its API afterwards, in the background.
    logs_follow: bool = False


# In the order they run. At N = 100,000: 20,000 runs for each fast method, 5,000 for the
# API engine and bulk_delete, 1,000 for the slow ones, 8,000 kept.
METHODS = (
    Method("sql_ceiling", sql_ceiling, 0.20),
    Method("sql_engine", sql_engine, 0.20),
    Method("sql_engine_default", sql_engine_default, 0.20),
    Method("prefect_db_vacuum", prefect_db_vacuum, 0.20),
    Method("api_engine", api_engine, 0.05, logs_follow=True),
    Method("api_bulk_delete", api_bulk_delete, 0.05, logs_follow=True),
    Method("api_delete", api_delete, 0.01, logs_follow=True),
    Method("docs_flow", docs_flow, 0.01, states=DOCS_FLOW_STATES, logs_follow=True),
)
METHODS_BY_NAME = {method.name: method for method in METHODS}
OURS = ("sql_engine", "sql_engine_default", "api_engine")


def _runs_per_second(name: str) -> Callable[[Mapping[str, Any]], float | None]:
    return lambda results: results.get(f"{name}_runs_per_s")


def _speedup(
    name: str, baseline: str, *, until_logs_gone: bool = False
) -> Callable[[Mapping[str, Any]], float | None]:
    figure = "runs_per_s_until_logs_gone" if until_logs_gone else "runs_per_s"
    return lambda results: ratio(results.get(f"{name}_{figure}"), results.get(f"{baseline}_{figure}"))


def _orphans(name: str) -> Callable[[Mapping[str, Any]], float | None]:
    return lambda results: results["orphans_left"].get(name)


def _probe_slowdown(name: str) -> Callable[[Mapping[str, Any]], float | None]:
    return lambda results: ratio(results.get(f"probe_p99_ms_during_{name}"), results.get("probe_p99_ms_idle"))


TARGETS = (
    Target("sql_engine runs/s ≥ 0.8 × sql_ceiling", _speedup("sql_engine", "sql_ceiling"), 0.8),
    Target("sql_engine runs/s ≥ 1.5 × prefect_db_vacuum", _speedup("sql_engine", "prefect_db_vacuum"), 1.5),
    Target("sql_engine runs/s ≥ 100 × docs_flow", _speedup("sql_engine", "docs_flow"), 100),
    Target("sql_engine leaves 0 orphans", _orphans("sql_engine"), 0, at_most=True),
    Target("sql_engine_default leaves 0 orphans", _orphans("sql_engine_default"), 0, at_most=True),
    Target("api_engine leaves 0 orphans", _orphans("api_engine"), 0, at_most=True),
    Target("api_engine runs/s ≥ api_bulk_delete", _speedup("api_engine", "api_bulk_delete"), 1.0),
    Target(
        "api_engine runs/s ≥ api_bulk_delete, both until their logs are gone",
        _speedup("api_engine", "api_bulk_delete", until_logs_gone=True),
        1.0,
    ),
    Target(
        "probe p99 during sql_engine_default ≤ 2 × idle",
        _probe_slowdown("sql_engine_default"),
        2.0,
        at_most=True,
    ),
)


@dataclass(frozen=True)
class Options:
    runs: int = DEFAULT_RUNS
    slices: Mapping[str, int] | None = None
    methods: tuple[str, ...] = tuple(METHODS_BY_NAME)
    batch_size: int = DEFAULT_BATCH_SIZE
    idle_seconds: float = DEFAULT_IDLE_SECONDS
    log_wait_seconds: float = DEFAULT_LOG_WAIT_SECONDS
    logs_gone_wait_seconds: float = DEFAULT_LOGS_GONE_WAIT_SECONDS

    def slice_sizes(self) -> dict[str, int]:
        """Runs per method: its share of N unless given; the rest of N is kept."""
        given = dict(self.slices or {})
        sizes = {
            name: given.get(name, round(METHODS_BY_NAME[name].share * self.runs)) for name in self.methods
        }
        if sum(sizes.values()) > self.runs:
            raise ValueError(
                f"the slices add up to {sum(sizes.values()):,} runs, more than --runs {self.runs:,}"
            )
        return sizes


async def _watch_logs(
    method: Method, database_url: str, count: SliceCount, waited: float, until_seconds: float
) -> tuple[SliceCount, float]:
    """Count the slice again until no log of a deleted run is left or `until_seconds` have been
    waited in all; the last count, and the seconds waited in all."""
    while method.logs_follow and count.orphans["log"] and waited < until_seconds:
        await asyncio.sleep(LOG_POLL_SECONDS)
        waited += LOG_POLL_SECONDS
        count = await count_slice(database_url, method.name)
    return count, waited


async def measure_method(
    method: Method, workload: Workload, probe: Probe, log_wait_seconds: float, logs_gone_wait_seconds: float
) -> dict[str, Any]:
    """Run one method on its slice; what it deleted, how fast, what it left, how the API felt."""
    database_url = workload.database_url
    before = await count_slice(database_url, method.name)
    expected = await runs_in_states(database_url, method.name, method.states)
    window_start = time.time()
    started = time.perf_counter()
    details = await method.run(workload)
    seconds = time.perf_counter() - started
    window_end = time.time()
    after = await count_slice(database_url, method.name)
    log_orphans_at_end = after.orphans["log"]
    after, waited = await _watch_logs(method, database_url, after, 0.0, log_wait_seconds)
    left_after_wait = after
    after, waited = await _watch_logs(
        method, database_url, after, waited, log_wait_seconds + logs_gone_wait_seconds
    )
    # Logs are what the server deletes after a method returns; other orphans stay for good.
    logs_gone_seconds = seconds + waited if after.orphans["log"] == 0 else None
    await settle(database_url)
    runs_deleted = before.rows["flow_run"] - after.rows["flow_run"]
    rows_deleted = before.total_rows - left_after_wait.total_rows
    probe_summary = probe.summary(window_start, window_end)
    return {
        "slice_runs": workload.slice.runs,
        "runs_expected": expected,
        "runs_deleted": runs_deleted,
        "rows_deleted": rows_deleted,
        "seconds": round(seconds, 3),
        "runs_per_s": round(runs_deleted / seconds, 1),
        "rows_per_s": round(rows_deleted / seconds, 1),
        "orphans": left_after_wait.orphans,
        "orphans_total": left_after_wait.total_orphans,
        "log_orphans_when_it_returned": log_orphans_at_end,
        "seconds_waited_for_logs": waited,
        "seconds_until_logs_gone": None if logs_gone_seconds is None else round(logs_gone_seconds, 3),
        "runs_per_s_until_logs_gone": None
        if logs_gone_seconds is None
        else round(runs_deleted / logs_gone_seconds, 1),
        "probe": probe_summary,
        **(details or {}),
    }


async def benchmark(server: PrefectServer, options: Options, samples_file: Path) -> dict[str, Any]:
    """The whole benchmark against `server`, which the client settings already point at."""
    database_url = server.database_url
    sizes = options.slice_sizes()
    kept = options.runs - sum(sizes.values())
    results: dict[str, Any] = {
        "benchmark": "retention",
        "runs": options.runs,
        "slices": sizes,
        "kept_runs": kept,
        "batch_size": options.batch_size,
        "older_than_days": OLDER_THAN_DAYS,
        **await machine_and_versions(database_url),
    }
    started = time.perf_counter()
    slices = await seed_slices(database_url, sizes, oldest="prefect_db_vacuum", kept=kept)
    results["seed_seconds"] = round(time.perf_counter() - started, 1)
    log.info(
        "seeded %s runs in %.0f s: %s, kept %s", f"{options.runs:,}", results["seed_seconds"], sizes, kept
    )
    kept_before = await count_slice(database_url, KEPT)
    probe = Probe(server.api_url, samples_file).start()
    methods = {}
    try:
        if set(OURS) & set(options.methods):
            await warm_up(Workload(slices[KEPT], database_url, OLDER_THAN_DAYS, options.batch_size))
        await probe.sampling()
        idle_started = time.time()
        await asyncio.sleep(options.idle_seconds)
        idle = probe.summary(idle_started, time.time())
        log.info("probe on the idle server: p50 %s ms, p99 %s ms", idle["p50_ms"], idle["p99_ms"])
        results["probe_idle"] = idle
        results["probe_p50_ms_idle"] = idle["p50_ms"]
        results["probe_p99_ms_idle"] = idle["p99_ms"]
        for name in options.methods:
            if sizes[name] == 0:
                continue
            workload = Workload(slices[name], database_url, OLDER_THAN_DAYS, options.batch_size)
            measured = await measure_method(
                METHODS_BY_NAME[name],
                workload,
                probe,
                options.log_wait_seconds,
                options.logs_gone_wait_seconds,
            )
            log.info(
                "%s: %s runs in %.1f s (%s runs/s), %s orphans left, probe p99 %s ms",
                name,
                f"{measured['runs_deleted']:,}",
                measured["seconds"],
                f"{measured['runs_per_s']:,.0f}",
                measured["orphans_total"],
                measured["probe"]["p99_ms"],
            )
            methods[name] = measured
            results[f"{name}_runs_per_s"] = measured["runs_per_s"]
            results[f"{name}_runs_per_s_until_logs_gone"] = measured["runs_per_s_until_logs_gone"]
            results[f"probe_p50_ms_during_{name}"] = measured["probe"]["p50_ms"]
            results[f"probe_p99_ms_during_{name}"] = measured["probe"]["p99_ms"]
    finally:
        probe.stop()
    results["methods"] = methods
    results["orphans_left"] = {name: measured["orphans_total"] for name, measured in methods.items()}
    kept_after = await count_slice(database_url, KEPT)
    results["kept_rows_intact"] = kept_after.rows == kept_before.rows
    results["targets"] = [target.verdict(results) for target in TARGETS]
    await flush_flow_logs()
    return results


def to_markdown(results: Mapping[str, Any]) -> str:
    rows = [
        (
            name,
            format_number(measured["slice_runs"]),
            format_number(measured["runs_deleted"]),
            format_number(measured["seconds"]),
            format_number(measured["runs_per_s"]),
            format_number(measured["rows_per_s"]),
            format_number(measured["orphans_total"]),
            format_number(measured["runs_per_s_until_logs_gone"]),
            format_number(measured["probe"]["p50_ms"]),
            format_number(measured["probe"]["p99_ms"]),
        )
        for name, measured in results["methods"].items()
    ]
    idle = results["probe_idle"]
    rows.append(
        ("(idle)", "", "", "", "", "", "", "", format_number(idle["p50_ms"]), format_number(idle["p99_ms"]))
    )
    return benchmark_markdown(
        f"Retention benchmark: {results['runs']:,} runs seeded, batch size {results['batch_size']}",
        markdown_table(
            [
                "method",
                "slice",
                "runs deleted",
                "seconds",
                "runs/s",
                "rows/s",
                "orphans left",
                "runs/s until its logs are gone",
                "probe p50 ms",
                "probe p99 ms",
            ],
            rows,
        ),
        results,
        f"Rows of the kept runs intact: {'yes' if results['kept_rows_intact'] else 'NO'}",
    )


def _slice_option(value: str) -> tuple[str, int]:
    name, equals, runs = value.partition("=")
    if not equals or name not in METHODS_BY_NAME or not runs.isdigit():
        raise argparse.ArgumentTypeError(
            f"expected METHOD=RUNS with METHOD one of {', '.join(METHODS_BY_NAME)}"
        )
    return name, int(runs)


def _methods_option(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in METHODS_BY_NAME]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown}; known: {', '.join(METHODS_BY_NAME)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.retention", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="finished runs to seed (N)")
    parser.add_argument(
        "--slice",
        type=_slice_option,
        action="append",
        default=[],
        metavar="METHOD=RUNS",
        help="runs in a method's slice (default: its share of N); repeatable",
    )
    parser.add_argument(
        "--methods",
        type=_methods_option,
        default=tuple(METHODS_BY_NAME),
        help="comma-separated subset, in order",
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="runs per batch (SQL methods)"
    )
    parser.add_argument("--idle-seconds", type=float, default=DEFAULT_IDLE_SECONDS)
    parser.add_argument(
        "--log-wait-seconds",
        type=float,
        default=DEFAULT_LOG_WAIT_SECONDS,
        help="orphaned logs are counted after the server had this long to delete them",
    )
    parser.add_argument(
        "--logs-gone-wait-seconds",
        type=float,
        default=DEFAULT_LOGS_GONE_WAIT_SECONDS,
        help="then how much longer to watch, to time when every log of the deleted runs is gone",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    args = parser.parse_args(argv)
    show_progress()
    options = Options(
        runs=args.runs,
        slices=dict(args.slice),
        methods=args.methods,
        batch_size=args.batch_size,
        idle_seconds=args.idle_seconds,
        log_wait_seconds=args.log_wait_seconds,
        logs_gone_wait_seconds=args.logs_gone_wait_seconds,
    )
    try:
        options.slice_sizes()
    except ValueError as error:
        parser.error(str(error))
    with (
        bench_server(args.state_dir, DATABASE, fresh=True) as server,
        tempfile.TemporaryDirectory() as scratch,
    ):
        results = asyncio.run(benchmark(server, options, Path(scratch) / "probe-samples.txt"))
    return report_results("bench.retention", argv, args.json, results, to_markdown)


if __name__ == "__main__":
    raise SystemExit(main())
