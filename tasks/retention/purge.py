"""The retention flow's tasks: resolve the policy, delete batch after batch, sweep, vacuum.

`purge_expired_runs` is the loop: for each batch of expired runs it waits for the
throttle, calls `delete_batch` (one transaction; tried again when the connection breaks,
since a broken batch was rolled back whole), logs one line and moves the progress
artifact. It stops cleanly at a batch boundary when `max_minutes` is up, and then counts
what remains.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from time import monotonic

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.database import describe_error
from tasks.prefect_api import HEARTBEAT_EVENT
from tasks.reports import Progress
from tasks.retention.engine import RetentionEngine
from tasks.retention.parameters import RetentionParameters
from tasks.retention.policy import RetentionPolicy, RunRecord
from tasks.retention.rate_limit import Deadline, Throttle
from tasks.retention.report import BatchOutcome, RetentionTotals, StoppedReason
from tasks.retention.selection import build_policy, expired_batches
from tasks.retention.sql_housekeeping import EventRetention
from tasks.retention.sql_partitions import PartitionDrops

# The progress artifact moves at most this often.
PROGRESS_SECONDS = 2.0
# A failed batch is tried again this many times, after this pause.
BATCH_RETRIES = 2
BATCH_RETRY_DELAY_SECONDS = 1.0


@dataclass
class PurgeResult:
    totals: RetentionTotals = field(default_factory=RetentionTotals)
    stopped_reason: StoppedReason = "finished"
    remaining: int = 0
    error: str | None = None


@task(name="resolve-policy", cache_policy=NO_CACHE)
async def resolve_policy(engine: RetentionEngine, parameters: RetentionParameters) -> RetentionPolicy:
    """Names to ids, and the runs `keep_last_per_deployment` keeps; read-only."""
    return await build_policy(engine, parameters)


async def delete_batch(
    engine: RetentionEngine, runs: list[RunRecord], policy: RetentionPolicy, dry_run: bool
) -> BatchOutcome:
    """One batch of trees, judged on fresh rows and deleted together (counted in a dry run).

    Tried again up to `BATCH_RETRIES` times, a second apart, when it fails (a broken
    connection, a killed session): a failed batch was rolled back whole. A plain call, not
    a Prefect task: a task run per batch cost the server and the flow about 13 ms a batch,
    a tenth of a batch's time, and its log line and the progress artifact are its record.
    """
    failures = 0
    while True:
        try:
            return await engine.process_batch(runs, policy, dry_run)
        except Exception as error:
            failures += 1
            if failures > BATCH_RETRIES:
                raise
            get_run_logger().warning(
                "the batch failed (attempt %d of %d), trying again: %s",
                failures,
                BATCH_RETRIES + 1,
                describe_error(error),
            )
            await asyncio.sleep(BATCH_RETRY_DELAY_SECONDS)


async def purge_expired_runs(
    engine: RetentionEngine,
    policy: RetentionPolicy,
    parameters: RetentionParameters,
    throttle: Throttle,
    deadline: Deadline,
) -> PurgeResult:
    logger = get_run_logger()
    verb = "would delete" if parameters.dry_run else "deleted"
    result = PurgeResult()
    progress = BackgroundProgress(Progress("Retention: candidate runs examined"))
    candidates = max(await engine.count_candidates(policy), 1)
    batches = expired_batches(engine, policy, parameters.batch_size)
    async for batch in batches:
        if deadline.passed:
            result.stopped_reason = "max_minutes"
            # Top-level runs only: counting their subflows would cost a dry run of the rest.
            result.remaining = len(batch.runs) + sum([len(rest.runs) async for rest in batches])
            logger.warning("max_minutes reached: stopped; %d expired top-level runs remain", result.remaining)
            break
        if not parameters.dry_run:
            await throttle.before_batch(len(batch.runs))
        try:
            outcome = await delete_batch(engine, batch.runs, policy, parameters.dry_run)
        except Exception as error:
            result.stopped_reason = "failed"
            result.error = describe_error(error)
            logger.error(
                "batch %d failed after its retries, stopping: %s", result.totals.batches + 1, result.error
            )
            break
        if not parameters.dry_run:
            throttle.after_batch(outcome.seconds, len(batch.runs))
        result.totals.add(outcome)
        logger.info(
            "batch %d: %s %d flow runs%s in %.2f s; %d so far%s",
            result.totals.batches,
            verb,
            len(outcome.runs),
            _rows_in_brackets({**outcome.rows, **outcome.collections.counts()}),
            outcome.seconds,
            result.totals.flow_runs,
            f"; left {sum(outcome.left.values())} top-level runs" if outcome.left else "",
        )
        progress.show(100 * batch.candidates_read / candidates)
    await progress.finish(100 if result.stopped_reason == "finished" else None)
    return result


class BackgroundProgress:
    """Progress updates that never hold up a batch: at most one in flight and one every
    `PROGRESS_SECONDS` (each costs the server that is also serving the batches), the newest wins."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._sending: asyncio.Task[None] | None = None
        self._sent_at = -PROGRESS_SECONDS

    def show(self, percent: float) -> None:
        if monotonic() - self._sent_at < PROGRESS_SECONDS:
            return
        if self._sending is not None:
            if not self._sending.done():
                return
            self._sending.result()  # a failed update surfaces here
        self._sent_at = monotonic()
        self._sending = asyncio.create_task(self._progress.update(percent))

    async def finish(self, percent: float | None) -> None:
        if self._sending is not None:
            await self._sending
        if percent is not None:
            await self._progress.update(percent)


@contextmanager
def heap_frozen() -> Iterator[None]:
    """Leave the objects alive now (Prefect's and ours, hundreds of thousands) out of full
    garbage collections until the block ends.

    Every batch reads and drops thousands of rows; without this, a full collection walks
    the whole heap every few batches (measured: 150 ms each, against 20 ms for reading
    5,000 runs).
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _rows_in_brackets(rows: Mapping[str, int]) -> str:
    other = [f"{table} {count}" for table, count in sorted(rows.items()) if table != "flow_run" and count]
    return f" ({', '.join(other)})" if other else ""


@task(name="sweep-orphans", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)
async def sweep_orphans(
    engine: RetentionEngine, parameters: RetentionParameters, deadline: Deadline
) -> dict[str, int]:
    """Logs, artifacts, collections and cache rows whose run (or artifact, or state) is gone."""
    if not parameters.include_orphans or engine.housekeeping is None:
        return {}
    return await engine.housekeeping.sweep_orphans(deadline, dry_run=parameters.dry_run)


def event_rules(parameters: RetentionParameters, now: datetime) -> list[EventRetention]:
    """Heartbeats first when they have the shorter retention, then every other event."""
    every_event = parameters.events_older_than_days
    heartbeats = parameters.heartbeat_events_older_than_days
    heartbeats_first = heartbeats is not None and (every_event is None or heartbeats < every_event)
    rules = []
    if heartbeats_first:
        rules.append(EventRetention(now - timedelta(days=heartbeats), event=HEARTBEAT_EVENT))
    if every_event is not None:
        excluded = HEARTBEAT_EVENT if heartbeats_first else None
        rules.append(EventRetention(now - timedelta(days=every_event), except_event=excluded))
    return rules


@task(name="drop-old-partitions", cache_policy=NO_CACHE)
async def drop_old_partitions(
    engine: RetentionEngine, parameters: RetentionParameters, rules: list[EventRetention]
) -> PartitionDrops:
    """Partitioned `events` and `event_resources` (docs/scale.md): each partition all of whose
    rows are past the age goes whole, before the row deletes. Elsewhere: nothing to do."""
    if engine.housekeeping is None:
        return PartitionDrops()
    return await engine.housekeeping.drop_old_partitions(rules, dry_run=parameters.dry_run)


@task(name="delete-old-events", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)
async def delete_old_events(
    engine: RetentionEngine,
    parameters: RetentionParameters,
    deadline: Deadline,
    rules: list[EventRetention],
    partitions: PartitionDrops,
) -> dict[str, int]:
    """`event_resources` then `events`, past `events_older_than_days` (heartbeats: their own
    age), row by row where `partitions` did not drop them whole."""
    if engine.housekeeping is None:
        return {}
    return await engine.housekeeping.delete_old_events(
        rules, deadline, dry_run=parameters.dry_run, dropped_up_to=partitions.events_covered_up_to()
    )


@task(name="vacuum-tables", cache_policy=NO_CACHE)
async def vacuum_tables(
    engine: RetentionEngine, parameters: RetentionParameters, deleted: Iterable[Mapping[str, int]]
) -> list[str]:
    """`VACUUM (ANALYZE)` every table rows were deleted from, so the space is reused and plans stay good."""
    if not parameters.vacuum or parameters.dry_run or engine.housekeeping is None:
        return []
    return await engine.housekeeping.vacuum(
        table for rows in deleted for table, count in rows.items() if count
    )


@task(name="wait-for-log-deletion", cache_policy=NO_CACHE)
async def wait_for_log_deletion(engine: RetentionEngine, parameters: RetentionParameters) -> int:
    """API engine: wait until the server has deleted the deleted runs' logs from its background
    queue (or stops making progress); at most how many runs' logs are still queued. The SQL
    engine deletes them itself, and servers before 3.4.9 queue nothing: nothing to wait for."""
    if parameters.dry_run:
        return 0
    return await engine.wait_for_log_deletion()


def limitations(engine: RetentionEngine, parameters: RetentionParameters, logs_queued: int = 0) -> list[str]:
    """What this run could not do or did not count, for the report's notes."""
    notes = ["Dry run: nothing was changed."] if parameters.dry_run else []
    return notes + engine.limitations(parameters, logs_queued)
