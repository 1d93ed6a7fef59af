"""The retention flow's tasks: resolve the policy, delete batch after batch, sweep, vacuum.

`purge_expired_runs` is the loop: for each batch of expired runs it waits for the
throttle, runs the `delete_batch` task (one transaction; retried when the connection
breaks, since a broken batch was rolled back whole), logs one line and moves the progress
artifact. It stops cleanly at a batch boundary when `max_minutes` is up, and then counts
what remains.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from time import monotonic

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from tasks.prefect_api import DELETES_LOGS_OF_DELETED_RUNS, HEARTBEAT_EVENT
from tasks.reports import Progress
from tasks.retention.api_engine import ApiEngine
from tasks.retention.parameters import RetentionParameters
from tasks.retention.policy import RetentionPolicy, RunRecord
from tasks.retention.rate_limit import Deadline, Throttle
from tasks.retention.report import BatchOutcome, RetentionTotals, StoppedReason
from tasks.retention.selection import Engine, build_policy, expired_batches
from tasks.retention.sql_engine import EventRetention, SqlEngine

# The progress artifact moves at most this often.
PROGRESS_SECONDS = 2.0


@dataclass
class PurgeResult:
    totals: RetentionTotals = field(default_factory=RetentionTotals)
    stopped_reason: StoppedReason = "finished"
    remaining: int = 0
    error: str | None = None


@task(name="resolve-policy", cache_policy=NO_CACHE)
async def resolve_policy(engine: Engine, parameters: RetentionParameters) -> RetentionPolicy:
    """Names to ids, and the runs `keep_last_per_deployment` keeps; read-only."""
    return await build_policy(engine, parameters)


@task(name="delete-batch", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
async def delete_batch(
    engine: Engine, runs: list[RunRecord], policy: RetentionPolicy, dry_run: bool
) -> BatchOutcome:
    """One batch of trees, judged on fresh rows and deleted together (counted in a dry run)."""
    return await engine.process_batch(runs, policy, dry_run)


async def purge_expired_runs(
    engine: Engine,
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
            # quote(): Prefect would otherwise walk every run record of the batch, every batch.
            outcome = await delete_batch(engine, quote(batch.runs), quote(policy), parameters.dry_run)
        except Exception as error:
            result.stopped_reason = "failed"
            result.error = f"{type(error).__name__}: {error}"
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
            _rows_in_brackets(outcome.rows),
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
    engine: Engine, parameters: RetentionParameters, deadline: Deadline
) -> dict[str, int]:
    """Logs, artifacts, collections and cache rows whose run (or artifact, or state) is gone."""
    if not parameters.include_orphans or not isinstance(engine, SqlEngine):
        return {}
    return await engine.sweep_orphans(deadline, dry_run=parameters.dry_run)


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


@task(name="delete-old-events", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)
async def delete_old_events(
    engine: Engine, parameters: RetentionParameters, deadline: Deadline
) -> dict[str, int]:
    """`event_resources` then `events`, past `events_older_than_days` (heartbeats: their own age)."""
    if not isinstance(engine, SqlEngine):
        return {}
    rules = event_rules(parameters, datetime.now(UTC))
    return await engine.delete_old_events(rules, deadline, dry_run=parameters.dry_run)


@task(name="vacuum-tables", cache_policy=NO_CACHE)
async def vacuum_tables(
    engine: Engine, parameters: RetentionParameters, deleted: Iterable[Mapping[str, int]]
) -> list[str]:
    """`VACUUM (ANALYZE)` every table rows were deleted from, so the space is reused and plans stay good."""
    if not parameters.vacuum or parameters.dry_run or not isinstance(engine, SqlEngine):
        return []
    return await engine.vacuum(table for rows in deleted for table, count in rows.items() if count)


@task(name="wait-for-log-deletion", cache_policy=NO_CACHE)
async def wait_for_log_deletion(engine: Engine, parameters: RetentionParameters) -> int:
    """API engine: wait until the server has deleted the deleted runs' logs from its background
    queue (or stops making progress); at most how many runs' logs are still queued. Servers
    before 3.4.9 queue nothing, so there is nothing to wait for."""
    if parameters.dry_run or not isinstance(engine, ApiEngine):
        return 0
    return await engine.wait_for_log_deletion()


def limitations(engine: Engine, parameters: RetentionParameters, logs_queued: int = 0) -> list[str]:
    """What this run could not do or did not count, for the report's notes."""
    notes = []
    if parameters.dry_run:
        notes.append("Dry run: nothing was changed.")
    if isinstance(engine, SqlEngine):
        if engine.dialect == "sqlite" and parameters.vacuum and not parameters.dry_run:
            notes.append(
                "SQLite: tables were analysed only; VACUUM rewrites the whole file, run it in a quiet hour."
            )
        return notes
    notes += _log_notes(engine, parameters.dry_run, logs_queued)
    if engine.database is None:
        notes.append(
            "API engine without database access: the task run cache rows of the deleted runs (if "
            "they had any) could not be removed, the API has no route for them; they stay until a "
            "run with database access and include_orphans sweeps them."
        )
    if parameters.include_orphans:
        notes.append("API engine: orphans are swept by the SQL engine only; none were swept.")
    if (
        parameters.events_older_than_days is not None
        or parameters.heartbeat_events_older_than_days is not None
    ):
        notes.append(
            "API engine: events need database access and were not deleted "
            "(the server's own event retention, PREFECT_EVENTS_RETENTION_PERIOD, still applies)."
        )
    return notes


def _log_notes(engine: ApiEngine, dry_run: bool, logs_queued: int) -> list[str]:
    """Where the deleted runs' logs went, or stay: the server deletes them itself only from 3.4.9."""
    if engine.server_deletes_logs:
        if dry_run:
            return [
                "API engine: the server deletes the logs of the runs it deletes, in its background "
                "queue; logs are not counted here."
            ]
        if logs_queued:
            return [
                f"API engine: the logs of up to {logs_queued} deleted runs were still in the server's "
                "deletion queue when it stopped making progress (the queue is kept in memory: lost if "
                "the server restarts; a run with database access and include_orphans sweeps them)."
            ]
        return [
            "API engine: the server deleted the logs of the deleted runs in its background queue; "
            "this run waited for it. Logs are not counted here."
        ]
    server = (
        f"this server (Prefect {_dotted(engine.server_version)}) never deletes the logs of deleted "
        f"runs (Prefect does from {_dotted(DELETES_LOGS_OF_DELETED_RUNS)})"
    )
    if engine.database is not None:
        verb = "would delete" if dry_run else "deleted"
        return [f"API engine: {server}; this run {verb} them through the database (counted under log)."]
    sweep = "until a retention run with database access and include_orphans sweeps them."
    if dry_run:
        return [
            f"API engine: {server}: the logs of the {engine.runs_with_logs_left} runs to delete would stay {sweep}"
        ]
    return [f"API engine: {server}: the logs of the {engine.runs_with_logs_left} deleted runs stay {sweep}"]


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))
