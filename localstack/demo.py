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

from sqlalchemy import bindparam, text  # noqa: E402

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


MAINTENANCE_FLOWS = ("retention", "reconcile-stuck-runs", "db-health-report")
# What the maintenance runs themselves write: their flow runs, task runs, logs and events.
OWN_ROWS = {
    "flow_run": "SELECT count(*) FROM flow_run JOIN flow ON flow.id = flow_run.flow_id WHERE flow.name IN :flows",
    "task_run": "SELECT count(*) FROM task_run JOIN flow_run ON flow_run.id = task_run.flow_run_id "
    "JOIN flow ON flow.id = flow_run.flow_id WHERE flow.name IN :flows",
    "log": "SELECT count(*) FROM log JOIN flow_run ON flow_run.id = log.flow_run_id "
    "JOIN flow ON flow.id = flow_run.flow_id WHERE flow.name IN :flows",
}


async def table_counts() -> dict[str, int]:
    from tasks.database import connect

    async with connect() as connection:
        return {
            table: (await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
            for table in PREFECT_TABLES
        }


async def own_rows() -> dict[str, int]:
    """Rows of the maintenance flows' own runs, per table."""
    from tasks.database import connect

    async with connect() as connection:
        return {
            table: (
                await connection.execute(
                    text(statement).bindparams(bindparam("flows", expanding=True)),
                    {"flows": MAINTENANCE_FLOWS},
                )
            ).scalar_one()
            for table, statement in OWN_ROWS.items()
        }


def print_counts(
    title: str,
    counts: dict[str, int],
    before: dict[str, int] | None = None,
    own: dict[str, int] | None = None,
) -> None:
    print(f"\n{title}")
    for table, count in counts.items():
        change = "" if before is None else f"  ({count - before[table]:+,})"
        mine = f"  of which the maintenance runs' own: {own[table]:,}" if own and own.get(table) else ""
        print(f"  {table:22} {count:>8,}{change}{mine}")


async def run_flows() -> None:
    from localstack.summaries import FLOW_STEPS

    for step in FLOW_STEPS:
        started = time.perf_counter()
        report = await step.run()
        print(f"\n== {step.title} ({time.perf_counter() - started:.1f} s)")
        for line in step.summarize(report):
            print(f"  {line}")


async def deploy_maintenance() -> None:
    """The four maintenance deployments on the demo's server: `make up` then shows them,
    with their Custom run forms."""
    from deploy.bootstrap import bootstrap

    print("\nDeploying the maintenance flows onto this server (make deploy):")
    for line in await bootstrap():
        if not line.startswith("next:"):
            print(f"  {line}")


async def story(stack: Stack) -> None:
    database_url = stack.database_url
    print("Seeding a messy Prefect history...")
    history = await seed_messy_history(database_url)
    print("\nSeeded:")
    for name, count in history.counts().items():
        print(f"  {name:40} {count}")
    before = await table_counts()
    print_counts("Rows in Prefect's tables:", before)
    await run_flows()
    await flush_to_server()
    print_counts(
        "Rows in Prefect's tables after maintenance (the maintenance runs add their own runs, "
        "task runs, logs and events):",
        await table_counts(),
        before,
        await own_rows(),
    )
    await deploy_maintenance()


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

    from localstack.client import pointed_at

    try:
        with pointed_at(stack.api_url, stack.database_url):
            asyncio.run(story(stack))
    finally:
        if not args.keep_running:
            stack.down()
            print(
                "\nStack stopped. `make up` starts it again with this data: the reports under "
                f"{stack.server.ui_url}/artifacts, the maintenance deployments and their Custom run "
                f"forms under {stack.server.ui_url}/deployments."
            )
    print(f"Demo finished in {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
