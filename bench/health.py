"""Health report benchmark: how long `db-health-report` takes on a big database.

On the shared population database (`bench.population`: N finished runs), after one
warm-up report that pays the flow engine's start-up, the report with its defaults is
timed several times; with `--exact`, once more with `exact=True` (pgstattuple on the top
tables), which reads those tables and is expected to take longer.

    python -m bench.health --runs 1000000 --json .local/bench/health.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any

from bench.harness import (
    Target,
    benchmark_markdown,
    flush_flow_logs,
    format_number,
    machine_and_versions,
)
from bench.population import ensure_population, population_benchmark_main
from flows.db_health import db_health_report
from tasks.reports import human_bytes, markdown_table

DEFAULT_PASSES = 3
REPORT_BUDGET_SECONDS = 15.0
SLOWEST_SHOWN = 5

log = logging.getLogger("bench.health")


async def timed_report(**parameters: Any) -> dict[str, Any]:
    started = time.perf_counter()
    report = await db_health_report(**parameters)
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "flow_seconds": report.seconds,
        "verdict": report.verdict,
        "flags": len(report.flags),
        "database_bytes": report.database_bytes,
        "slowest_checks": dict(
            sorted(report.check_seconds.items(), key=lambda item: -item[1])[:SLOWEST_SHOWN]
        ),
    }


async def benchmark(database_url: str, runs: int, passes: int, exact: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"benchmark": "health", **await machine_and_versions(database_url)}
    population = await ensure_population(database_url, runs)
    results.update(population)
    log.info(
        "population: %s runs (%s seeded now)", f"{population['runs']:,}", f"{population['runs_seeded_now']:,}"
    )
    await timed_report()
    results["passes"] = []
    for _ in range(passes):
        measured = await timed_report()
        results["passes"].append(measured)
        log.info("report: %.2f s, verdict %s", measured["seconds"], measured["verdict"])
    results["health_report_seconds"] = statistics.median(entry["seconds"] for entry in results["passes"])
    results["database_bytes"] = results["passes"][-1]["database_bytes"]
    if exact:
        results["exact"] = await timed_report(exact=True)
        results["health_report_exact_seconds"] = results["exact"]["seconds"]
        log.info("exact report: %.2f s", results["exact"]["seconds"])
    target = Target(
        f"report ≤ {REPORT_BUDGET_SECONDS:g} s on {population['runs']:,} runs",
        lambda measured: measured["health_report_seconds"],
        REPORT_BUDGET_SECONDS,
        at_most=True,
    )
    results["targets"] = [target.verdict(results)]
    await flush_flow_logs()
    return results


def _slowest(measured: dict[str, Any]) -> str:
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in measured["slowest_checks"].items())


def to_markdown(results: dict[str, Any]) -> str:
    size = results["database_bytes"]
    rows = [
        (
            f"defaults (median of {len(results['passes'])})",
            format_number(results["runs"]),
            format_number(results["health_report_seconds"]),
            results["passes"][-1]["verdict"],
            _slowest(results["passes"][-1]),
        )
    ]
    if "exact" in results:
        rows.append(
            (
                "exact=True",
                format_number(results["runs"]),
                format_number(results["exact"]["seconds"]),
                results["exact"]["verdict"],
                _slowest(results["exact"]),
            )
        )
    return benchmark_markdown(
        f"Health report benchmark: {results['runs']:,} finished runs"
        + (f", database {human_bytes(size)}" if size else ""),
        markdown_table(["report", "runs in database", "seconds", "verdict", "slowest checks (s)"], rows),
        results,
    )


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--passes", type=int, default=DEFAULT_PASSES, help="timed reports after the warm-up")
    parser.add_argument("--exact", action="store_true", help="also time one report with exact=True")


def main(argv: list[str] | None = None) -> int:
    return population_benchmark_main(
        "bench.health",
        __doc__.split("\n")[0],
        argv,
        _options,
        lambda database_url, args: benchmark(database_url, args.runs, args.passes, args.exact),
        to_markdown,
    )


if __name__ == "__main__":
    raise SystemExit(main())
