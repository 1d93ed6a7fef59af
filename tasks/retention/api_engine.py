"""The API engine: retention through the Prefect API (Prefect Cloud, or no database access).

Per batch of top-level runs: read them again with their subflows (level by level through
`parent_flow_run_id`), let the policy judge each tree, then delete the accepted runs with
`POST /flow_runs/bulk_delete` (50 a call, filtered by id *and* terminal state, so a run
that left its terminal state in the meantime stays), deepest subflows first: a parent is
only deleted once all of its subflows are, so none is ever left as a fake top-level run.
Servers before 3.6.16 have no `bulk_delete`; there each run is read again just before its
`DELETE /flow_runs/{id}` (which deletes a run in any state) and deleted only if it still
reads exactly as the policy judged it. The deleted runs' artifacts go with
`DELETE /artifacts/{id}` (the server re-points their collections: `artifact_collections`).
With `archive_to`, the accepted trees are read through the API and archived (`api_archive`)
before the first delete.

The API has no way to delete logs, cache rows or events. The server deletes a deleted
run's logs itself from 3.4.9, in a queue the engine waits for (`api_logs`). With a database
configured (engine "api" chosen explicitly), what the API leaves (the logs older servers
keep, and the task run cache rows of the deleted runs) is deleted by the ids of each batch
through the SQL engine's housekeeping (the SQL engine's modules are the only ones that
write to Prefect's tables); without one it stays, and the report says so (`limitations`).

Calls run with bounded concurrency; 429, 5xx answers and timeouts slow the throttle down
and are retried after a back-off.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager, nullcontext
from time import perf_counter
from typing import Any, TypeVar
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from pydantic import SecretStr

from tasks.prefect_api import (
    BULK_FLOW_RUN_ROUTES,
    BULK_LIMIT,
    DELETES_LOGS_OF_DELETED_RUNS,
    PAGE_SIZE,
    PrefectApiError,
    api_time,
    call,
    chunks,
    paginate,
    prefect_client,
    server_has,
    server_version,
)
from tasks.retention.api_archive import api_batch_rows
from tasks.retention.api_logs import LOG_QUEUE_RUNS, DeletedRunLogs
from tasks.retention.archive import BatchArchive
from tasks.retention.artifact_collections import ApiArtifacts
from tasks.retention.parameters import TERMINAL_STATES, RetentionParameters
from tasks.retention.policy import CHANGED, RetentionPolicy, RunRecord, age_reference, judge_trees
from tasks.retention.rate_limit import Throttle
from tasks.retention.report import BatchOutcome
from tasks.retention.sql_engine import SqlEngine
from tasks.retention.sql_housekeeping import SqlHousekeeping

# Answers that mean "the server is struggling": slow down and try again.
PUSHBACK_STATUSES = {429, 500, 502, 503, 504}
ATTEMPTS = 5
T = TypeVar("T")


def run_record(row: dict[str, Any]) -> RunRecord:
    state = row.get("state")
    return RunRecord(
        id=UUID(row["id"]),
        name=row["name"],
        flow_id=UUID(row["flow_id"]),
        deployment_id=UUID(row["deployment_id"]) if row.get("deployment_id") else None,
        # A run without a state shows as "Unknown": not known to be finished.
        state_type=row.get("state_type") if state else None,
        finished=age_reference(
            api_time(row.get("end_time")),
            api_time(state["timestamp"]) if state else None,
            api_time(row.get("expected_start_time")),
            api_time(row.get("created")),
        ),
        tags=tuple(row.get("tags") or ()),
        parent_task_run_id=UUID(row["parent_task_run_id"]) if row.get("parent_task_run_id") else None,
    )


def _ids(values: Iterable[UUID]) -> list[str]:
    return [str(value) for value in values]


class ApiEngine:
    """Retention through the Prefect API; one instance per flow run."""

    name = "api"
    # The API does not say how big rows are.
    measures_space = False
    # Old events, orphans and VACUUM need the database itself: the API has no route for them.
    housekeeping: SqlHousekeeping | None = None
    archive: BatchArchive | None = None

    def __init__(
        self,
        client: PrefectClient,
        throttle: Throttle,
        concurrency: int,
        *,
        server_version: tuple[int, ...],
        bulk_delete_exists: bool,
        server_deletes_logs: bool,
        database: SqlHousekeeping | None,
    ) -> None:
        self._client = client
        self._throttle = throttle
        self._slots = asyncio.Semaphore(concurrency)
        self.server_version = server_version
        self._bulk_delete_exists = bulk_delete_exists
        # Deletes what the API cannot (logs the server keeps, cache rows); None without access.
        self._database = database
        self.logs = DeletedRunLogs(
            self._call,
            server_version=server_version,
            server_deletes_logs=server_deletes_logs,
            database_given=database is not None,
        )
        self._artifacts = ApiArtifacts(self._all, self._call, self._gather)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, database_url: str | SecretStr | None, throttle: Throttle, concurrency: int
    ) -> AsyncIterator[ApiEngine]:
        """The engine for the configured API; `database_url` (reachable) for what the API cannot delete."""
        database = (
            SqlEngine.open(database_url, throttle, concurrency) if database_url is not None else nullcontext()
        )
        async with prefect_client() as client, database as sql:
            yield cls(
                client,
                throttle,
                concurrency,
                server_version=await server_version(client),
                bulk_delete_exists=await server_has(client, BULK_FLOW_RUN_ROUTES),
                server_deletes_logs=await server_has(client, DELETES_LOGS_OF_DELETED_RUNS),
                database=sql.housekeeping if sql is not None else None,
            )

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """The API has no lock to offer; the deployments' concurrency limit of 1 keeps purges apart."""
        yield

    async def _call(self, method: str, path: str, json: Any = None) -> Any:
        return await self._with_backoff(lambda: call(self._client, method, path, json=json))

    async def _all(self, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        """Every row of a filter route, all pages."""

        async def every_page() -> list[dict[str, Any]]:
            return [row async for row in paginate(self._client, path, body)]

        return await self._with_backoff(every_page)

    async def _with_backoff(self, request: Callable[[], Awaitable[T]]) -> T:
        """At most `concurrency` requests at a time; retried with back-off when the server pushes back."""
        attempt = 0
        while True:
            try:
                async with self._slots:
                    return await request()
            except PrefectApiError as error:
                pushback = error.status_code is None or error.status_code in PUSHBACK_STATUSES
                if not pushback or attempt == ATTEMPTS - 1:
                    raise
            await self._throttle.after_pushback(attempt)
            attempt += 1

    async def _gather(self, calls: Iterable[Awaitable[T]]) -> list[T]:
        return list(await asyncio.gather(*calls))

    # Reads -----------------------------------------------------------------------------

    async def deployments_named(self, names: Iterable[str]) -> dict[str, UUID]:
        names = set(names)
        deployments = await self._all(
            "/deployments/filter",
            {"deployments": {"name": {"any_": sorted({name.partition("/")[2] for name in names})}}},
        )
        flow_names, _ = await self.names_of({UUID(row["flow_id"]) for row in deployments}, ())
        found = {
            f"{flow_names.get(UUID(row['flow_id']))}/{row['name']}": UUID(row["id"]) for row in deployments
        }
        return {name: deployment_id for name, deployment_id in found.items() if name in names}

    async def flows_named(self, names: Iterable[str]) -> dict[str, UUID]:
        flows = await self._all("/flows/filter", {"flows": {"name": {"any_": sorted(set(names))}}})
        return {row["name"]: UUID(row["id"]) for row in flows}

    async def newest_per_deployment(self, keep: int) -> set[UUID]:
        """The `keep` newest finished runs of every deployment, ranked exactly as the SQL engine ranks them."""
        deployments = await self._all("/deployments/filter", {})
        kept: set[UUID] = set()
        for deployment in deployments:
            finished = {
                "deployment_id": {"any_": [deployment["id"]]},
                "state": {"type": {"any_": list(TERMINAL_STATES)}},
            }
            newest = await self._call(
                "POST",
                "/flow_runs/filter",
                {
                    "flow_runs": {**finished, "end_time": {"is_null_": False}},
                    "sort": "END_TIME_DESC",
                    "limit": keep,
                },
            )
            candidates = [run_record(row) for row in newest]
            if len(newest) == keep:
                # Runs that ended at the same moment as the last one compete for its place.
                ties = await self._all(
                    "/flow_runs/filter",
                    {"flow_runs": {**finished, "end_time": {"after_": newest[-1]["end_time"]}}},
                )
                candidates += [run_record(row) for row in ties]
            without_end = await self._all(
                "/flow_runs/filter", {"flow_runs": {**finished, "end_time": {"is_null_": True}}}
            )
            candidates += [run_record(row) for row in without_end]
            ranked = sorted(
                {run.id: run for run in candidates if run.is_terminal}.values(),
                key=lambda run: (run.finished, run.id),
                reverse=True,
            )
            kept.update(run.id for run in ranked[:keep])
        return kept

    def _candidate_filters(self, policy: RetentionPolicy) -> list[dict[str, Any]]:
        """Two API filters whose union is never narrower than the policy (the API has no COALESCE)."""
        common: dict[str, Any] = {
            "parent_task_run_id": {"is_null_": True},
            "state": {"type": {"any_": list(policy.states)}},
        }
        if policy.deployment_ids is not None:
            common["deployment_id"] = {"any_": _ids(policy.deployment_ids)}
        if policy.tags:
            common["tags"] = {"any_": sorted(policy.tags)}
        flows = {"flows": {"id": {"any_": _ids(policy.flow_ids)}}} if policy.flow_ids is not None else {}
        return [
            {**flows, "flow_runs": {**common, "end_time": {"before_": policy.latest_cutoff.isoformat()}}},
            {**flows, "flow_runs": {**common, "end_time": {"is_null_": True}}},
        ]

    async def count_candidates(self, policy: RetentionPolicy) -> int:
        counts = [
            await self._call("POST", "/flow_runs/count", body) for body in self._candidate_filters(policy)
        ]
        return sum(counts)

    async def candidates(self, policy: RetentionPolicy, page_size: int) -> AsyncIterator[list[RunRecord]]:
        """All candidates are listed before the first is deleted: the API pages by offset, and
        deleting while paging would shift the pages."""
        runs: dict[UUID, RunRecord] = {}
        for body in self._candidate_filters(policy):
            for row in await self._all("/flow_runs/filter", {**body, "sort": "ID_DESC"}):
                runs[UUID(row["id"])] = run_record(row)
        oldest_first = sorted(runs.values(), key=lambda run: (run.finished, run.id))
        for page in chunks(oldest_first, page_size):
            yield page

    async def names_of(
        self, flow_ids: Iterable[UUID], deployment_ids: Iterable[UUID]
    ) -> tuple[dict[UUID, str], dict[UUID, str]]:
        flow_ids, deployment_ids = list(flow_ids), list(deployment_ids)
        flows = (
            await self._all("/flows/filter", {"flows": {"id": {"any_": _ids(flow_ids)}}}) if flow_ids else []
        )
        deployments = (
            await self._all("/deployments/filter", {"deployments": {"id": {"any_": _ids(deployment_ids)}}})
            if deployment_ids
            else []
        )
        flow_names = {UUID(row["id"]): row["name"] for row in flows}
        missing = {UUID(row["flow_id"]) for row in deployments} - set(flow_names)
        if missing:
            flow_names.update((await self.names_of(missing, ()))[0])
        return (
            flow_names,
            {UUID(row["id"]): f"{flow_names.get(UUID(row['flow_id']))}/{row['name']}" for row in deployments},
        )

    # One batch -------------------------------------------------------------------------

    async def _runs(self, flow_runs_filter: dict[str, Any]) -> list[RunRecord]:
        return [
            run_record(row) for row in await self._all("/flow_runs/filter", {"flow_runs": flow_runs_filter})
        ]

    async def _trees(
        self, root_ids: list[UUID]
    ) -> tuple[dict[UUID, RunRecord], dict[UUID, list[UUID]], dict[UUID, int]]:
        """The roots and their subflows as they read now; members per root; depth per run."""
        current = {run.id: run for run in await self._runs({"id": {"any_": _ids(root_ids)}})}
        root_of = {root_id: root_id for root_id in root_ids}
        depth = dict.fromkeys(root_ids, 0)
        members_of: dict[UUID, list[UUID]] = {}
        parents = [root_id for root_id in root_ids if root_id in current]
        level = 0
        while parents:
            level += 1
            children = []
            for chunk in chunks(parents, PAGE_SIZE):
                children += await self._runs({"parent_flow_run_id": {"any_": _ids(chunk)}})
            if not children:
                break
            task_runs = {}
            for chunk in chunks(sorted({child.parent_task_run_id for child in children}), PAGE_SIZE):
                for row in await self._all("/task_runs/filter", {"task_runs": {"id": {"any_": _ids(chunk)}}}):
                    task_runs[UUID(row["id"])] = UUID(row["flow_run_id"])
            parents = []
            for child in children:
                root_id = root_of[task_runs[child.parent_task_run_id]]
                root_of[child.id] = root_id
                depth[child.id] = level
                members_of.setdefault(root_id, []).append(child.id)
                current[child.id] = child
                parents.append(child.id)
        return current, members_of, depth

    async def process_batch(
        self, roots: list[RunRecord], policy: RetentionPolicy, dry_run: bool
    ) -> BatchOutcome:
        if not dry_run:
            # Before the batch's clock starts: the throttle paces deleting, not this wait.
            await self.logs.wait(LOG_QUEUE_RUNS)
        started = perf_counter()
        root_ids = [run.id for run in roots]
        current, members_of, depth = await self._trees(root_ids)
        verdict = judge_trees(root_ids, members_of, current, policy)
        accepted_ids = [run.id for run in verdict.accepted]
        if not accepted_ids:
            return BatchOutcome(left=verdict.left, seconds=perf_counter() - started)
        # Read before the runs go: their task runs' states cascade away with them.
        states_of = await self._cached_states_of(accepted_ids) if self._database is not None else {}
        if self.archive is not None:
            # Written and read back before the first delete: a failed archive deletes nothing.
            await self.archive.keep(await api_batch_rows(self._client, self._with_backoff, accepted_ids))
        if dry_run:
            artifacts, changes = await self._artifacts.forecast(accepted_ids)
            rows = {"flow_run": len(accepted_ids), "artifact": artifacts}
            rows.update(await self._what_the_api_leaves(accepted_ids, states_of, dry_run=True))
            return BatchOutcome(
                runs=verdict.accepted,
                rows=rows,
                collections=changes,
                left=verdict.left,
                seconds=perf_counter() - started,
            )
        root_of = {member: root for root, members in members_of.items() for member in members}
        root_of.update((root_id, root_id) for root_id in root_ids)
        deleted, broken = await self._delete_deepest_first(verdict.accepted, depth, root_of)
        artifacts, changes = await self._artifacts.delete(list(deleted))
        rows = {"flow_run": len(deleted), "artifact": artifacts}
        rows.update(await self._what_the_api_leaves(list(deleted), states_of, dry_run=False))
        return BatchOutcome(
            runs=[run for run in verdict.accepted if run.id in deleted],
            rows=rows,
            collections=changes,
            left=verdict.left + Counter({CHANGED: len(broken)}),
            seconds=perf_counter() - started,
        )

    async def _delete_deepest_first(
        self, runs: list[RunRecord], depth: dict[UUID, int], root_of: dict[UUID, UUID]
    ) -> tuple[set[UUID], set[UUID]]:
        """Delete level by level from the deepest; a tree whose run could not be deleted stops there."""
        deleted: set[UUID] = set()
        broken: set[UUID] = set()
        for level in sorted({depth[run.id] for run in runs}, reverse=True):
            wanted = [run for run in runs if depth[run.id] == level and root_of[run.id] not in broken]
            for done in await self._gather(self._delete_runs(chunk) for chunk in chunks(wanted, BULK_LIMIT)):
                deleted |= done
            broken |= {root_of[run.id] for run in wanted if run.id not in deleted}
        return deleted, broken

    async def _delete_runs(self, runs: list[RunRecord]) -> set[UUID]:
        if self._bulk_delete_exists:
            body = {
                "flow_runs": {
                    "id": {"any_": _ids(run.id for run in runs)},
                    "state": {"type": {"any_": list(TERMINAL_STATES)}},
                },
                "limit": BULK_LIMIT,
            }
            answer = await self._call("POST", "/flow_runs/bulk_delete", body)
            return {UUID(run_id) for run_id in answer["deleted"]}
        done = await self._gather(self._delete_if_unchanged(run) for run in runs)
        return {run.id for run, gone in zip(runs, done, strict=True) if gone}

    async def _delete_if_unchanged(self, judged: RunRecord) -> bool:
        """`DELETE /flow_runs/{id}` checks nothing: delete the run only if it reads, just before,
        exactly as the policy judged it (so still terminal, still expired, still unprotected).
        A change in the moment between the two calls goes unseen; `bulk_delete` has no such gap."""
        try:
            if run_record(await self._call("GET", f"/flow_runs/{judged.id}")) != judged:
                return False
            await self._call("DELETE", f"/flow_runs/{judged.id}")
            return True
        except PrefectApiError as error:
            if error.status_code == 404:
                return False
            raise

    async def _cached_states_of(self, flow_run_ids: list[UUID]) -> dict[UUID, list[UUID]]:
        """Per run, the states its task runs hold that have a cache row: the server writes one
        for a Completed state whose details carry a cache key, the state such a task run
        stays in. A row of an earlier state (a task run forced on afterwards) is left to the
        orphan sweep."""
        states_of: dict[UUID, list[UUID]] = {}
        for chunk in chunks(flow_run_ids, PAGE_SIZE):
            body = {
                "task_runs": {
                    "flow_run_id": {"any_": _ids(chunk)},
                    "state": {"type": {"any_": ["COMPLETED"]}},
                }
            }
            for row in await self._all("/task_runs/filter", body):
                state = row.get("state") or {}
                if (state.get("state_details") or {}).get("cache_key"):
                    states_of.setdefault(UUID(row["flow_run_id"]), []).append(UUID(state["id"]))
        return states_of

    async def _what_the_api_leaves(
        self, flow_run_ids: list[UUID], states_of: dict[UUID, list[UUID]], *, dry_run: bool
    ) -> dict[str, int]:
        """The deleted runs' logs and cache rows: queued with the server (logs, from 3.4.9),
        deleted through the database when there is one, else counted as left."""
        self.logs.deleting(flow_run_ids, dry_run=dry_run)
        if self._database is None:
            return {}
        return await self._database.delete_left_by_the_api(
            [] if self.logs.server_deletes_logs else flow_run_ids,
            [state_id for run_id in flow_run_ids for state_id in states_of.get(run_id, ())],
            dry_run=dry_run,
        )

    # The report's notes ----------------------------------------------------------------

    def limitations(self, parameters: RetentionParameters, logs_queued: int) -> list[str]:
        """What this run could not do or did not count, for the report's notes."""
        notes = self.logs.notes(parameters.dry_run, logs_queued)
        if self._database is None:
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

    async def wait_for_log_deletion(self) -> int:
        """Wait until the server has deleted the logs of every run this engine deleted, or
        has stopped making progress; at most how many deleted runs still have logs."""
        return await self.logs.wait_for_all()
