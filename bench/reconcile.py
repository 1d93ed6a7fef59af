"""Reconcile benchmark: how long a pass takes on a big, healthy database, and how fast it fixes.

On the shared population database (`bench.population`: N finished runs, nothing stuck):

1. the idle pass: `reconcile-stuck-runs` with its defaults, several times (after one
   warm-up pass that pays the flow engine's start-up), on a database where it must find
   nothing: the cost every scheduled pass pays;
2. the fix rate: K stuck runs are created through the API (stuck Cancelling, stuck Pending,
   zombie Running with an old heartbeat, Unknown with the state row deleted) and their
   clocks moved back with SQL, then one pass with `max_actions=K` fixes them; what is still
   stuck afterwards is counted. The fixed runs are deleted afterwards through the API so
   that the database stays healthy for the next benchmark.

    python -m bench.reconcile --runs 1000000 --stuck 1000 --json .local/bench/reconcile.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from bench.harness import (
    Target,
    benchmark_markdown,
    flush_flow_logs,
    format_number,
    machine_and_versions,
)
from bench.population import ensure_population, population_benchmark_main
from flows.reconcile import reconcile_stuck_runs
from localstack.seed import MessyHistory, apply_clock_shifts, break_runs
from tasks.database import connect
from tasks.prefect_api import BULK_LIMIT, call, prefect_client
from tasks.reconcile.rules import TERMINAL_STATES
from tasks.reports import markdown_table
from tasks.settings import get_settings

DEFAULT_STUCK = 1_000
DEFAULT_IDLE_PASSES = 3
STUCK_FLOW = "bench-stuck"
STUCK_TAG = "bench-stuck"
IDLE_PASS_BUDGET_SECONDS = 5.0
HOUR = 3600.0

log = logging.getLogger("bench.reconcile")


@dataclass(frozen=True)
class StuckKind:
    """A way to be stuck, created in equal shares: the state a run is created in, how long
    ago (its clocks are moved back that far), and what else is broken about it."""

    rule: str
    state: str
    hours_ago: float
    heartbeat_hours_ago: float | None = None
    state_row_deleted: bool = False


STUCK_KINDS = (
    StuckKind("stuck-cancelling", "CANCELLING", 3),
    StuckKind("stuck-pending", "PENDING", 5),
    StuckKind("zombie", "RUNNING", 6, heartbeat_hours_ago=3),
    StuckKind("unknown-state", "RUNNING", 6, state_row_deleted=True),
)


async def create_stuck_runs(database_url: str, count: int) -> dict[str, list[uuid.UUID]]:
    """`count` stuck runs, in equal shares of the kinds, ready for a pass to find."""
    concurrency = get_settings().api_concurrency
    by_kind: dict[str, list[uuid.UUID]] = {}
    async with prefect_client() as client:
        flow = await call(client, "POST", "/flows/", json={"name": STUCK_FLOW})
        for index, kind in enumerate(STUCK_KINDS):
            share = count // len(STUCK_KINDS) + (1 if index < count % len(STUCK_KINDS) else 0)
            body = {
                "flow_id": flow["id"],
                "tags": [STUCK_TAG],
                "state": {"type": kind.state, "name": kind.state.title()},
            }
            ids = []
            for start in range(0, share, concurrency):
                rows = await asyncio.gather(
                    *(
                        call(client, "POST", "/flow_runs/", json=body)
                        for _ in range(min(concurrency, share - start))
                    )
                )
                ids += [uuid.UUID(row["id"]) for row in rows]
            by_kind[kind.rule] = ids
    for kind in STUCK_KINDS:
        ids = by_kind[kind.rule]
        await apply_clock_shifts(database_url, [(run_id, kind.hours_ago * HOUR) for run_id in ids])
        if kind.heartbeat_hours_ago is not None:
            await _insert_heartbeats(database_url, ids, kind.heartbeat_hours_ago)
        if kind.state_row_deleted:
            await break_runs(database_url, MessyHistory(prefix=STUCK_FLOW, unknown_state=ids))
    return by_kind


async def _insert_heartbeats(database_url: str, run_ids: list[uuid.UUID], hours_ago: float) -> None:
    """The last heartbeat event of each run, `hours_ago` old, as the server would have stored it."""
    statement = text(
        """
        INSERT INTO events (id, occurred, event, resource_id, resource, related_resource_ids, related,
                            payload, received, recorded)
        SELECT gen_random_uuid(), now() - make_interval(secs => :seconds), 'prefect.flow-run.heartbeat',
               'prefect.flow-run.' || run_id,
               jsonb_build_object('prefect.resource.id', 'prefect.flow-run.' || run_id),
               '[]'::jsonb, '[]'::jsonb, '{}'::jsonb, now(), now()
        FROM unnest(CAST(:ids AS uuid[])) AS run_id
        """
    )
    async with connect(database_url) as connection:
        await connection.execute(statement, {"ids": [str(i) for i in run_ids], "seconds": hours_ago * HOUR})
        await connection.commit()


async def still_stuck(database_url: str, run_ids: list[uuid.UUID]) -> int:
    statement = text(
        """
        SELECT count(*) FROM flow_run
        WHERE id = ANY(CAST(:ids AS uuid[]))
          AND (state_id IS NULL OR NOT CAST(state_type AS text) = ANY(CAST(:terminal AS text[])))
        """
    )
    parameters = {"ids": [str(i) for i in run_ids], "terminal": list(TERMINAL_STATES)}
    async with connect(database_url) as connection:
        return (await connection.execute(statement, parameters)).scalar_one()


async def delete_stuck_runs() -> None:
    """Through the API, like anyone would: the benchmark's stuck runs, once fixed."""
    async with prefect_client() as client:
        while (
            await call(
                client,
                "POST",
                "/flow_runs/bulk_delete",
                json={"flow_runs": {"tags": {"all_": [STUCK_TAG]}}, "limit": BULK_LIMIT},
            )
        )["deleted"]:
            pass


async def timed_pass(**parameters: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    report = await reconcile_stuck_runs(**parameters)
    return time.perf_counter() - started, report


async def benchmark(database_url: str, runs: int, stuck: int, idle_passes: int) -> dict[str, Any]:
    results: dict[str, Any] = {"benchmark": "reconcile", **await machine_and_versions(database_url)}
    population = await ensure_population(database_url, runs)
    results.update(population)
    log.info(
        "population: %s runs (%s seeded now)", f"{population['runs']:,}", f"{population['runs_seeded_now']:,}"
    )
    # Stuck runs left by an interrupted benchmark would be found by the idle passes.
    await delete_stuck_runs()
    await timed_pass(dry_run=True)
    idle = []
    for _ in range(idle_passes):
        seconds, report = await timed_pass()
        idle.append({"seconds": round(seconds, 3), "flow_seconds": report.seconds, "found": report.found})
        log.info("idle pass: %.2f s, found %d", seconds, report.found)
    results["idle_passes"] = idle
    results["reconcile_idle_pass_seconds"] = statistics.median(entry["seconds"] for entry in idle)
    results["reconcile_idle_found"] = max(entry["found"] for entry in idle)
    started = time.perf_counter()
    by_kind = await create_stuck_runs(database_url, stuck)
    results["stuck_runs"] = {rule: len(ids) for rule, ids in by_kind.items()}
    results["stuck_create_seconds"] = round(time.perf_counter() - started, 1)
    all_stuck = [run_id for ids in by_kind.values() for run_id in ids]
    seconds, report = await timed_pass(max_actions=max(stuck, 1))
    results["reconcile_fix_seconds"] = round(seconds, 3)
    results["reconcile_fix_flow_seconds"] = report.seconds
    results["reconcile_found"] = report.found
    results["reconcile_fixed"] = report.fixed
    results["reconcile_fixed_per_rule"] = {rule.rule: rule.fixed for rule in report.rules if rule.found}
    results["reconcile_fix_runs_per_s"] = round(report.fixed / seconds, 1)
    results["reconcile_left_stuck"] = await still_stuck(database_url, all_stuck)
    log.info("fix pass: fixed %d of %d in %.1f s", report.fixed, stuck, seconds)
    await delete_stuck_runs()
    targets = (
        Target(
            f"idle pass ≤ {IDLE_PASS_BUDGET_SECONDS:g} s on {population['runs']:,} runs",
            lambda measured: measured["reconcile_idle_pass_seconds"],
            IDLE_PASS_BUDGET_SECONDS,
            at_most=True,
        ),
        Target("idle pass finds nothing", lambda measured: measured["reconcile_idle_found"], 0, at_most=True),
        Target("every stuck run fixed", lambda measured: measured["reconcile_left_stuck"], 0, at_most=True),
    )
    results["targets"] = [target.verdict(results) for target in targets]
    await flush_flow_logs()
    return results


def to_markdown(results: dict[str, Any]) -> str:
    rows = [
        (
            "idle pass (median)",
            format_number(results["runs"]),
            format_number(results["reconcile_idle_pass_seconds"]),
            format_number(results["reconcile_idle_found"]),
            "",
            "",
        ),
        (
            "fix pass",
            format_number(results["runs"]),
            format_number(results["reconcile_fix_seconds"]),
            format_number(results["reconcile_found"]),
            format_number(results["reconcile_fixed"]),
            format_number(results["reconcile_fix_runs_per_s"]),
        ),
    ]
    return benchmark_markdown(
        f"Reconcile benchmark: {results['runs']:,} finished runs, {sum(results['stuck_runs'].values()):,} "
        f"stuck ({', '.join(f'{rule} {count}' for rule, count in results['stuck_runs'].items())})",
        markdown_table(["pass", "runs in database", "seconds", "found", "fixed", "fixed/s"], rows),
        results,
    )


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stuck", type=int, default=DEFAULT_STUCK, help="stuck runs to create and fix (K)")
    parser.add_argument("--idle-passes", type=int, default=DEFAULT_IDLE_PASSES)


def main(argv: list[str] | None = None) -> int:
    return population_benchmark_main(
        "bench.reconcile",
        __doc__.split("\n")[0],
        argv,
        _options,
        lambda database_url, args: benchmark(database_url, args.runs, args.stuck, args.idle_passes),
        to_markdown,
    )


if __name__ == "__main__":
    raise SystemExit(main())
