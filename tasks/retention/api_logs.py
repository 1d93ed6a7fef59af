"""The logs of the runs the API engine deletes: the API has no route to delete logs.

From 3.4.9 the server deletes a deleted run's logs itself, in its background queue. That
queue is in memory by default (lost if the server restarts) and drains far slower than
runs are deleted, so the engine keeps it short: at most `LOG_QUEUE_RUNS` deleted runs may
still have logs before the next batch waits for the server, and at the end the purge waits
until every deleted run's logs are gone (or the server stops making progress). Older
servers never delete them: nothing is waited for, and they are deleted through the
database when the engine has one, or counted as left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from time import monotonic
from typing import Any
from uuid import UUID

from tasks.prefect_api import DELETES_LOGS_OF_DELETED_RUNS, chunks, version_text
from tasks.reports import plural

# Deleted runs whose logs may wait in the server's queue before the next batch waits too.
LOG_QUEUE_RUNS = 1_000
LOG_POLL_SECONDS = 0.5
# Deleted runs looked up per call; the server mostly deletes their logs in order.
LOG_CHECK_RUNS = 50
# No run's logs deleted for this long: the server is not deleting them (stop waiting).
LOG_STALL_SECONDS = 30.0

ApiCall = Callable[[str, str, Any], Awaitable[Any]]


class DeletedRunLogs:
    """Where the deleted runs' logs go: the server's queue (waited for), or nowhere."""

    def __init__(
        self,
        call: ApiCall,
        *,
        server_version: tuple[int, ...],
        server_deletes_logs: bool,
        database_given: bool,
    ) -> None:
        self._call = call
        self.server_version = server_version
        self.server_deletes_logs = server_deletes_logs
        self._database_given = database_given
        # Deleted runs whose logs the server may not have deleted yet, oldest first.
        self._queued: dict[UUID, None] = {}
        self._stalled = False
        # Deleted (in a dry run: to be deleted) runs whose logs nothing here deletes.
        self.runs_with_logs_left = 0

    def deleting(self, flow_run_ids: list[UUID], *, dry_run: bool) -> None:
        """These runs are deleted (or, in a dry run, would be): their logs are queued with
        the server, or stay when neither it nor the database deletes them."""
        if self.server_deletes_logs:
            if not dry_run:
                self.expect(flow_run_ids)
        elif not self._database_given:
            self.runs_with_logs_left += len(flow_run_ids)

    def expect(self, flow_run_ids: Iterable[UUID]) -> None:
        """Deleted runs whose logs the server deletes in its queue: the next batch and the end of
        the purge wait for them (see `LOG_QUEUE_RUNS`)."""
        self._queued.update(dict.fromkeys(flow_run_ids))

    async def wait_for_all(self) -> int:
        """Wait until the server has deleted the logs of every run deleted, or has stopped
        making progress; at most how many deleted runs still have logs."""
        await self.wait(0)
        return len(self._queued)

    async def wait(self, at_most: int) -> None:
        """Wait until at most `at_most` deleted runs still have logs."""
        progress_at = monotonic()
        while len(self._queued) > at_most and not self._stalled:
            before = len(self._queued)
            await self._forget_runs_without_logs()
            if len(self._queued) < before:
                progress_at = monotonic()
            elif monotonic() - progress_at > LOG_STALL_SECONDS:
                self._stalled = True
            elif len(self._queued) > at_most:
                await asyncio.sleep(LOG_POLL_SECONDS)

    async def _forget_runs_without_logs(self) -> None:
        """Drop queued runs, oldest first, a few at a time while none of them has a log left."""
        for chunk in chunks(list(self._queued), LOG_CHECK_RUNS):
            body = {"logs": {"flow_run_id": {"any_": [str(run_id) for run_id in chunk]}}, "limit": 1}
            if await self._call("POST", "/logs/filter", body):
                return
            for run_id in chunk:
                del self._queued[run_id]

    def notes(self, dry_run: bool, logs_queued: int) -> list[str]:
        """Where the deleted runs' logs went, or stay, for the report's notes."""
        if self.server_deletes_logs:
            if dry_run:
                return [
                    "API engine: the server deletes the logs of the runs it deletes, in its background "
                    "queue; logs are not counted here."
                ]
            if logs_queued:
                return [
                    f"API engine: the logs of up to {plural(logs_queued, 'deleted run')} were still in the "
                    "server's deletion queue when it stopped making progress (the queue is kept in memory: "
                    "lost if the server restarts; a run with database access and include_orphans sweeps them)."
                ]
            return [
                "API engine: the server deleted the logs of the deleted runs in its background queue; "
                "this run waited for it. Logs are not counted here."
            ]
        server = (
            f"this server (Prefect {version_text(self.server_version)}) never deletes the logs of deleted "
            f"runs (Prefect does from {version_text(DELETES_LOGS_OF_DELETED_RUNS)})"
        )
        if self._database_given:
            verb = "would delete" if dry_run else "deleted"
            return [f"API engine: {server}; this run {verb} them through the database (counted under log)."]
        sweep = "until a retention run with database access and include_orphans sweeps them."
        if dry_run:
            return [
                f"API engine: {server}: the logs of the {plural(self.runs_with_logs_left, 'run')} to delete would stay {sweep}"
            ]
        return [
            f"API engine: {server}: the logs of the {plural(self.runs_with_logs_left, 'deleted run')} stay {sweep}"
        ]
