"""The SQL engine: retention straight in Prefect's database (PostgreSQL or SQLite).

The SQL engine's modules are the only ones in the project that write to Prefect's tables:
this one judges and deletes the expired runs' trees (with what they own: `sql_owned_rows`),
`sql_housekeeping` (this engine's `housekeeping`) sweeps old events and orphans and
vacuums, and all build on `sql_database`.

Per batch of top-level runs, one short transaction:
1. read the batch's runs again, locking them (`FOR UPDATE SKIP LOCKED`; on SQLite the
   transaction starts with `BEGIN IMMEDIATE` instead), with every subflow
   (`parent_task_run_id -> task_run -> flow_run`, any depth, a level of the trees per
   statement, each run read with its children's ids);
2. let the policy judge each tree;
3. delete the accepted runs with what they own, measuring the space of the rows, and
   re-point or delete the artifact collections whose latest artifact went (`sql_owned_rows`;
   a dry run counts and measures the same rows and forecasts the collections).
With `archive_to`, the accepted trees' rows are archived (`sql_archive`) between 2 and 3.
A run that changed or is locked is left for the next run; a batch that cannot get its
locks within `lock_timeout` is left whole. A purge holds a PostgreSQL advisory lock, so two
purges never overlap.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from time import perf_counter
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from prefect.server.schemas.states import StateType
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.retention.archive import BatchArchive
from tasks.retention.parameters import TERMINAL_STATES, RetentionParameters
from tasks.retention.policy import RetentionPolicy, RunRecord, judge_trees
from tasks.retention.rate_limit import Throttle
from tasks.retention.report import BatchOutcome
from tasks.retention.sql_archive import archive_batch
from tasks.retention.sql_database import (
    DEPLOYMENT,
    FLOW,
    FLOW_RUN,
    NIL_UUID,
    TASK_RUN,
    PrefectDatabase,
    first_line,
)
from tasks.retention.sql_housekeeping import SqlHousekeeping
from tasks.retention.sql_owned_rows import OwnedRows


def _age_reference() -> sa.ColumnElement[datetime]:
    """The SQL twin of `policy.age_reference`."""
    return sa.func.coalesce(
        FLOW_RUN.c.end_time, FLOW_RUN.c.state_timestamp, FLOW_RUN.c.expected_start_time, FLOW_RUN.c.created
    )


# What a `RunRecord` holds, worked out by the database: decoding four timestamps and an
# enum per row in Python would cost more than deleting the row.
RUN_COLUMNS = (
    FLOW_RUN.c.id,
    FLOW_RUN.c.name,
    FLOW_RUN.c.flow_id,
    FLOW_RUN.c.deployment_id,
    sa.case(
        (FLOW_RUN.c.state_id.is_(None), sa.null()), else_=sa.cast(FLOW_RUN.c.state_type, sa.String)
    ).label("state_type"),
    _age_reference().label("finished"),
    FLOW_RUN.c.tags,
    FLOW_RUN.c.parent_task_run_id,
)


# Lock timeout (PostgreSQL) and a busy database (SQLite): leave the batch for later.
BUSY_SQLSTATES = {"55P03"}
ADVISORY_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"prefect-maintenance retention").digest()[:8], "big", signed=True
)


class RetentionAlreadyRunning(RuntimeError):
    """Another purge holds the retention advisory lock on this database."""


class SqlBatchFailed(RuntimeError):
    """A batch's transaction failed and was rolled back; nothing of it was deleted."""


def run_record(row: Any) -> RunRecord:
    return RunRecord(
        id=row.id,
        name=row.name,
        flow_id=row.flow_id,
        deployment_id=row.deployment_id,
        state_type=row.state_type,
        finished=row.finished,
        tags=tuple(row.tags or ()),
        parent_task_run_id=row.parent_task_run_id,
    )


def _state_types(states: Iterable[str]) -> list[StateType]:
    return [StateType(state) for state in states]


class SqlEngine:
    """Retention through direct database access; one instance per flow run."""

    name = "sql"

    # Orphans, old events and VACUUM: the SQL engine's own housekeeping module.
    housekeeping: SqlHousekeeping
    archive: BatchArchive | None = None

    def __init__(self, database: PrefectDatabase) -> None:
        self._database = database
        self.housekeeping = SqlHousekeeping(database)
        self._owned = OwnedRows(database)

    @property
    def measures_space(self) -> bool:
        """Whether batches measure the space of the rows they delete: PostgreSQL only."""
        return self._database.dialect == "postgresql"

    @classmethod
    @asynccontextmanager
    async def open(
        cls, database_url: str | SecretStr | None, throttle: Throttle, concurrency: int
    ) -> AsyncIterator[SqlEngine]:
        """The engine on the database at `database_url`, its connections closed on exit.

        `throttle` and `concurrency` pace API calls, and this engine makes none: the purge
        loop paces its batches."""
        if database_url is None:
            raise ValueError("the SQL engine needs a database URL")
        database = PrefectDatabase(database_url)
        try:
            yield cls(database)
        finally:
            await database.dispose()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the retention advisory lock (PostgreSQL) for the whole purge."""
        if self._database.dialect != "postgresql":
            # Every SQLite write transaction is exclusive already.
            yield
            return
        async with self._database.connect() as connection:
            # Autocommit: the session holds the lock without sitting idle in a transaction.
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            locked = (
                await connection.execute(sa.select(sa.func.pg_try_advisory_lock(ADVISORY_LOCK_KEY)))
            ).scalar()
            if not locked:
                raise RetentionAlreadyRunning(
                    "another retention run is deleting in this database (it holds the retention "
                    "advisory lock); nothing was deleted, try again when it has finished"
                )
            try:
                yield
            finally:
                # A lost session has released the lock already.
                with contextlib.suppress(sa.exc.DBAPIError):
                    await connection.execute(sa.select(sa.func.pg_advisory_unlock(ADVISORY_LOCK_KEY)))

    # Reads -----------------------------------------------------------------------------

    async def deployments_named(self, names: Iterable[str]) -> dict[str, UUID]:
        names = set(names)
        rows = await self._database.read(
            sa.select(DEPLOYMENT.c.id, FLOW.c.name.label("flow_name"), DEPLOYMENT.c.name)
            .select_from(DEPLOYMENT.join(FLOW, FLOW.c.id == DEPLOYMENT.c.flow_id))
            .where(DEPLOYMENT.c.name.in_({name.partition("/")[2] for name in names}))
        )
        found = {f"{row.flow_name}/{row.name}": row.id for row in rows}
        return {name: deployment_id for name, deployment_id in found.items() if name in names}

    async def flows_named(self, names: Iterable[str]) -> dict[str, UUID]:
        rows = await self._database.read(sa.select(FLOW.c.name, FLOW.c.id).where(FLOW.c.name.in_(set(names))))
        return {row.name: row.id for row in rows}

    async def newest_per_deployment(self, keep: int) -> set[UUID]:
        """The `keep` newest finished runs of every deployment (by the age reference, then id)."""
        ranked = (
            sa.select(
                FLOW_RUN.c.id,
                sa.func.row_number()
                .over(
                    partition_by=FLOW_RUN.c.deployment_id,
                    order_by=(_age_reference().desc(), FLOW_RUN.c.id.desc()),
                )
                .label("position"),
            )
            .where(
                FLOW_RUN.c.deployment_id.is_not(None),
                FLOW_RUN.c.state_id.is_not(None),
                FLOW_RUN.c.state_type.in_(_state_types(TERMINAL_STATES)),
            )
            .subquery()
        )
        return {
            row.id
            for row in await self._database.read(sa.select(ranked.c.id).where(ranked.c.position <= keep))
        }

    def _candidate_filter(self, policy: RetentionPolicy) -> list[sa.ColumnElement[bool]]:
        """Never narrower than the policy (the policy decides on each row), and index-friendly."""
        conditions = [
            FLOW_RUN.c.parent_task_run_id.is_(None),
            FLOW_RUN.c.state_id.is_not(None),
            FLOW_RUN.c.state_type.in_(_state_types(policy.states)),
        ]
        if policy.deployment_ids is not None:
            conditions.append(self._database.among(FLOW_RUN.c.deployment_id, policy.deployment_ids))
        if policy.flow_ids is not None:
            conditions.append(self._database.among(FLOW_RUN.c.flow_id, policy.flow_ids))
        return conditions

    def _ended_before(self, policy: RetentionPolicy) -> sa.ColumnElement[bool]:
        return FLOW_RUN.c.end_time < policy.latest_cutoff

    def _never_ended_before(self, policy: RetentionPolicy) -> sa.ColumnElement[bool]:
        return sa.and_(FLOW_RUN.c.end_time.is_(None), _age_reference() < policy.latest_cutoff)

    async def count_candidates(self, policy: RetentionPolicy) -> int:
        old = sa.or_(self._ended_before(policy), self._never_ended_before(policy))
        rows = await self._database.read(
            sa.select(sa.func.count()).select_from(FLOW_RUN).where(*self._candidate_filter(policy), old)
        )
        return rows[0][0]

    async def candidates(self, policy: RetentionPolicy, page_size: int) -> AsyncIterator[list[RunRecord]]:
        """Candidate top-level runs a page at a time, oldest first.

        Keyset pages (deletions in between do not shift them): runs that ended, along the
        `end_time` index in (end_time, id) order; then the few that never got an end time.
        """
        conditions = self._candidate_filter(policy)
        last: tuple[datetime, UUID] | None = None
        while True:
            ended = [self._ended_before(policy)]
            if last is not None:
                ended += [
                    FLOW_RUN.c.end_time >= last[0],
                    sa.or_(FLOW_RUN.c.end_time > last[0], FLOW_RUN.c.id > last[1]),
                ]
            rows = await self._database.read(
                sa.select(*RUN_COLUMNS)
                .where(*conditions, *ended)
                .order_by(FLOW_RUN.c.end_time, FLOW_RUN.c.id)
                .limit(page_size)
            )
            if rows:
                yield [run_record(row) for row in rows]
                last = (rows[-1].finished, rows[-1].id)  # `finished` is the end time here
            if len(rows) < page_size:
                break
        after = NIL_UUID
        while True:
            rows = await self._database.read(
                sa.select(*RUN_COLUMNS)
                .where(*conditions, self._never_ended_before(policy), FLOW_RUN.c.id > after)
                .order_by(FLOW_RUN.c.id)
                .limit(page_size)
            )
            if rows:
                yield [run_record(row) for row in rows]
                after = rows[-1].id
            if len(rows) < page_size:
                return

    async def names_of(
        self, flow_ids: Iterable[UUID], deployment_ids: Iterable[UUID]
    ) -> tuple[dict[UUID, str], dict[UUID, str]]:
        flows = await self._database.read(
            sa.select(FLOW.c.id, FLOW.c.name).where(self._database.among(FLOW.c.id, flow_ids))
        )
        deployments = await self._database.read(
            sa.select(DEPLOYMENT.c.id, FLOW.c.name.label("flow_name"), DEPLOYMENT.c.name)
            .select_from(DEPLOYMENT.join(FLOW, FLOW.c.id == DEPLOYMENT.c.flow_id))
            .where(self._database.among(DEPLOYMENT.c.id, deployment_ids))
        )
        return (
            {row.id: row.name for row in flows},
            {row.id: f"{row.flow_name}/{row.name}" for row in deployments},
        )

    # One batch -------------------------------------------------------------------------

    async def process_batch(
        self, roots: list[RunRecord], policy: RetentionPolicy, dry_run: bool
    ) -> BatchOutcome:
        """Judge the batch's trees on fresh, locked rows and delete (or count) what may go."""
        started = perf_counter()
        root_ids = [run.id for run in roots]
        try:
            async with self._database.transaction(write=not dry_run) as connection:
                members_of, current = await self._read_trees(connection, root_ids, lock=not dry_run)
                verdict = judge_trees(root_ids, members_of, current, policy)
                accepted = [run.id for run in verdict.accepted]
                if self.archive is not None:
                    # In the batch's transaction: a failed archive rolls the batch back.
                    await archive_batch(connection, self._database.dialect, self.archive, accepted)
                outcome = (
                    await self._owned.count(connection, accepted)
                    if dry_run
                    else await self._owned.delete(connection, accepted)
                )
        except sa.exc.DBAPIError as error:
            if not _is_busy(error):
                raise SqlBatchFailed(f"the batch was rolled back: {first_line(error)}") from None
            return BatchOutcome(
                left=Counter({"locked: lock_timeout reached": len(roots)}), seconds=perf_counter() - started
            )
        outcome.runs, outcome.left, outcome.seconds = verdict.accepted, verdict.left, perf_counter() - started
        return outcome

    async def _read_trees(
        self, connection: AsyncConnection, root_ids: list[UUID], *, lock: bool
    ) -> tuple[dict[UUID, list[UUID]], dict[UUID, RunRecord]]:
        """The batch's runs and every subflow at any depth, read (and locked) a level of the
        trees per statement: each statement reads its level's runs with the ids of their
        child runs, the next level. A batch without subflows is one statement.

        Each run's children are found by probing the `parent_task_run_id` index once per task
        run of the run. A recursive CTE would be one statement, but PostgreSQL plans its
        recursive step blind (it guesses ten times the rows of the first) and hashes the
        whole task_run table for every batch: measured 25 ms a batch at 30,000 runs and
        growing with the table, against 2 ms here whatever its size. A run another
        transaction holds is skipped, children unread: its tree is left whole anyway.
        Returns each root's subflows and every run read, by id.
        """
        subflow = FLOW_RUN.alias("subflow")
        children = (
            sa.select(subflow.c.id)
            .select_from(TASK_RUN.join(subflow, subflow.c.parent_task_run_id == TASK_RUN.c.id))
            .where(TASK_RUN.c.flow_run_id == FLOW_RUN.c.id)
        )
        members_of: dict[UUID, list[UUID]] = {}
        current: dict[UUID, RunRecord] = {}
        root_of = {root: root for root in root_ids}
        level = root_ids
        while level:
            statement = sa.select(*RUN_COLUMNS, self._database.ids_of(children).label("child_ids")).where(
                self._database.among(FLOW_RUN.c.id, level)
            )
            if lock:
                # Rows another transaction is changing right now are skipped, never waited for.
                statement = statement.with_for_update(skip_locked=True, of=FLOW_RUN)
            level = []
            for row in await connection.execute(statement):
                current[row.id] = run_record(row)
                for child_id in self._database.ids_from(row.child_ids):
                    if child_id in root_of:  # a cycle in corrupt data: walk each run once
                        continue
                    root_of[child_id] = root_of[row.id]
                    members_of.setdefault(root_of[child_id], []).append(child_id)
                    level.append(child_id)
        return members_of, current

    # After the purge -------------------------------------------------------------------

    async def wait_for_log_deletion(self) -> int:
        """Nothing to wait for: the deleted runs' logs went in their batch's transaction."""
        return 0

    def limitations(self, parameters: RetentionParameters, logs_queued: int) -> list[str]:
        """What this run could not do, for the report's notes."""
        if self._database.dialect == "sqlite" and parameters.vacuum and not parameters.dry_run:
            return [
                "SQLite: tables were analysed only; VACUUM rewrites the whole file, run it in a quiet hour."
            ]
        return []


def _is_busy(error: sa.exc.DBAPIError) -> bool:
    if getattr(error.orig, "sqlstate", None) in BUSY_SQLSTATES:
        return True
    return "database is locked" in str(error.orig)
