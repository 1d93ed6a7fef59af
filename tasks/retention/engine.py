"""What the retention flow asks of an engine, the SQL engine (`sql_engine`) and the API
engine (`api_engine`) alike.

An engine is opened one way (`open`, an async context manager that closes it), resolves
the policy's names, lists candidate runs oldest first, and judges and deletes them a batch
at a time. What it does besides, it says: `housekeeping` (old events, orphans, VACUUM) is
the SQL engine's alone; `wait_for_log_deletion` waits for what the server deletes after the
engine (the API engine's runs' logs); `limitations` says what it could not do. The flow,
its tasks and `selection` know engines only through this protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, Self
from uuid import UUID

from pydantic import SecretStr

from tasks.retention.archive import BatchArchive
from tasks.retention.parameters import RetentionParameters
from tasks.retention.policy import RetentionPolicy, RunRecord
from tasks.retention.rate_limit import Throttle
from tasks.retention.report import BatchOutcome
from tasks.retention.sql_housekeeping import SqlHousekeeping


class RetentionEngine(Protocol):
    # The report's `engine`: "sql" or "api".
    name: str
    # Whether its batches measure the space of the rows they delete.
    measures_space: bool
    # Where each batch's rows are written (and verified) before the batch deletes them; None: nowhere.
    archive: BatchArchive | None

    @property
    def housekeeping(self) -> SqlHousekeeping | None:
        """Old events, orphans and VACUUM, in the database; None: this engine cannot do them."""
        ...

    @classmethod
    def open(
        cls, database_url: str | SecretStr | None, throttle: Throttle, concurrency: int
    ) -> AbstractAsyncContextManager[Self]:
        """The engine, closed on exit. `database_url`: the database to delete in (the SQL
        engine) or, when given, where to delete what the API cannot (the API engine);
        `throttle` and `concurrency` pace and bound API calls."""
        ...

    def exclusive(self) -> AbstractAsyncContextManager[None]:
        """Held for the whole purge so that two never overlap: the SQL engine's advisory lock; the
        API has none to offer (the deployments' concurrency limit of 1 keeps purges apart)."""
        ...

    async def deployments_named(self, names: Iterable[str]) -> dict[str, UUID]: ...

    async def flows_named(self, names: Iterable[str]) -> dict[str, UUID]: ...

    async def newest_per_deployment(self, keep: int) -> set[UUID]:
        """The `keep` newest finished runs of every deployment (by the age reference, then id)."""
        ...

    async def count_candidates(self, policy: RetentionPolicy) -> int: ...

    def candidates(self, policy: RetentionPolicy, page_size: int) -> AsyncIterator[list[RunRecord]]:
        """Candidate top-level runs, never fewer than the policy selects, oldest first."""
        ...

    async def names_of(
        self, flow_ids: Iterable[UUID], deployment_ids: Iterable[UUID]
    ) -> tuple[dict[UUID, str], dict[UUID, str]]: ...

    async def process_batch(
        self, roots: list[RunRecord], policy: RetentionPolicy, dry_run: bool
    ) -> BatchOutcome:
        """Judge the batch's trees as they read now and delete (in a dry run: count) what may go."""
        ...

    async def wait_for_log_deletion(self) -> int:
        """Wait for the server to delete what it deletes after this engine; how many deleted
        runs may still have logs when it stops."""
        ...

    def limitations(self, parameters: RetentionParameters, logs_queued: int) -> list[str]:
        """What this engine could not do or did not count in this run, for the report's notes."""
        ...
