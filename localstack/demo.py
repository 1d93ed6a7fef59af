"""The whole story on a fresh machine: a messy Prefect history, then the maintenance flows.

Starts the local stack (embedded PostgreSQL + Prefect server) on a clean database, seeds
the messy history, runs reconcile (dry run, then for real), retention (dry run, then for
real) and the health report, prints what each did and where to see it, and stops the
stack. `make up` afterwards shows the same database in the Prefect UI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

# The flows' own log lines go to the Prefect UI; the terminal shows the summaries only.
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")

from sqlalchemy import text  # noqa: E402

from localstack.seed import seed_messy_history  # noqa: E402
from localstack.stack import DEFAULT_PORT, DEFAULT_STATE_DIR, Stack  # noqa: E402

PREFECT_TABLES = (
    "flow_run",
    "flow_run_state",
    "task_run",
    "task_run_state",
    "log",
    "artifact",
    "artifact_collection",
    "events",
    "event_resources",
)


async def table_counts() -> dict[str, int]:
    from tasks.database import connect

    async with connect() as connection:
        return {
            table: (await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
            for table in PREFECT_TABLES
        }


def print_counts(title: str, counts: dict[str, int], before: dict[str, int] | None = None) -> None:
    print(f"\n{title}")
    for table, count in counts.items():
        change = "" if before is None else f"  ({count - before[table]:+,})"
        print(f"  {table:22} {count:>8,}{change}")


async def run_flows(ui_url: str) -> None:
    from localstack.summaries import FLOW_STEPS

    for step in FLOW_STEPS:
        started = time.perf_counter()
        report = await step.run()
        print(f"\n== {step.title} ({time.perf_counter() - started:.1f} s)")
        for line in step.summarize(report):
            print(f"  {line}")
    print(f"\nThe reports are artifacts in the Prefect UI: {ui_url}/artifacts")


async def story(stack: Stack) -> None:
    database_url = stack.database_url
    print("Seeding a messy Prefect history...")
    history = await seed_messy_history(database_url)
    print("\nSeeded:")
    for name, count in history.counts().items():
        print(f"  {name:40} {count}")
    before = await table_counts()
    print_counts("Rows in Prefect's tables:", before)
    await run_flows(stack.server.ui_url)
    print_counts("Rows in Prefect's tables after maintenance:", await table_counts(), before)
    await flush_to_server()


async def flush_to_server() -> None:
    """Send the flows' queued logs and events before the server stops."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler

    await APILogHandler.aflush()
    drained = EventsWorker.drain_all()
    if drained is not None and hasattr(drained, "__await__"):
        await drained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localstack.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--keep-running", action="store_true", help="leave the stack up afterwards")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    stack = Stack(state_dir=args.state_dir, port=args.port)
    # A clean story every time: stop what runs there and start on an empty database.
    stack.down()
    stack.postgres.start()
    stack.postgres.drop_database(stack.database)
    print("Starting embedded PostgreSQL and a Prefect server...")
    stack.up()
    print(f"Prefect UI: {stack.server.ui_url} (API {stack.api_url})")

    from localstack.client import pointed_at

    try:
        with pointed_at(stack.api_url, stack.database_url):
            asyncio.run(story(stack))
    finally:
        if not args.keep_running:
            stack.down()
            print("\nStack stopped. `make up` starts it again with this data for the UI.")
    print(f"Demo finished in {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
