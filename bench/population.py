"""The large database the reconcile and health benchmarks share: N finished runs, nothing stuck.

Seeding a million runs takes ten minutes or more, so it is done once: the database
(`bench_population`, in the benchmark's state folder) is kept between benchmark runs and
only topped up when it holds fewer seeded runs than asked for. `--fresh` starts over.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import text

from bench.harness import DEFAULT_STATE_DIR, bench_server, report_results, show_progress
from localstack.bulk_seed import bulk_seed
from tasks.database import connect

DATABASE = "bench_population"
PREFIX = "bench-population"
DEFAULT_RUNS = 1_000_000


async def ensure_population(database_url: str, runs: int) -> dict[str, Any]:
    """At least `runs` seeded finished runs (1-400 days old) in the database; what was done."""
    started = time.perf_counter()
    present = await seeded_runs(database_url)
    missing = max(0, runs - present)
    if missing:
        # A new prefix per top-up: each top-up gets its own flow and deployments.
        await bulk_seed(database_url, missing, prefix=f"{PREFIX}-{present}")
    return {
        "runs": present + missing,
        "runs_seeded_now": missing,
        "seed_seconds": round(time.perf_counter() - started, 1),
    }


async def seeded_runs(database_url: str) -> int:
    async with connect(database_url) as connection:
        statement = text(
            "SELECT count(*) FROM flow_run r JOIN flow f ON f.id = r.flow_id WHERE f.name LIKE :pattern"
        )
        return (await connection.execute(statement, {"pattern": f"{PREFIX}-%"})).scalar_one()


def add_population_options(parser: argparse.ArgumentParser, default_runs: int = DEFAULT_RUNS) -> None:
    parser.add_argument("--runs", type=int, default=default_runs, help="finished runs in the database (N)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--fresh", action="store_true", help="drop the seeded database and seed it again")


def population_benchmark_main(
    module: str,
    description: str,
    argv: list[str] | None,
    add_options: Callable[[argparse.ArgumentParser], None],
    benchmark: Callable[[str, argparse.Namespace], Awaitable[dict[str, Any]]],
    to_markdown: Callable[[Mapping[str, Any]], str],
) -> int:
    """The command line of a benchmark on the population database: its options, the server,
    the benchmark (given the database URL and the options), the results written and shown."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    add_population_options(parser)
    add_options(parser)
    args = parser.parse_args(argv)
    show_progress()
    with bench_server(args.state_dir, DATABASE, fresh=args.fresh) as server:
        results = asyncio.run(benchmark(server.database_url, args))
    return report_results(module, argv, args.json, results, to_markdown)
