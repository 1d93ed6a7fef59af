"""Selection: which engine, which policy, and the expired top-level runs batch by batch.

`open_engine` picks the SQL engine when a database URL is configured and reachable (or
when asked for), else the API engine, and opens it; asked for by name, the API engine also
gets the database when it is configured and reachable, for what the API cannot delete.
`build_policy` resolves names and the runs kept by `keep_last_per_deployment` once,
read-only. `expired_batches` streams candidate runs from the engine and keeps those the
policy selects. `count_expired_runs` is a dry run that only counts, `measure_expired_space`
one that measures the space of the rows within a time budget (for the health report);
`count_expired_top_level_runs` is one count query, for the health report.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import SecretStr

from tasks.database import is_reachable
from tasks.parameters import ParameterError
from tasks.retention.api_engine import ApiEngine
from tasks.retention.engine import RetentionEngine
from tasks.retention.parameters import RetentionParameters
from tasks.retention.policy import RetentionPolicy, RunRecord
from tasks.retention.rate_limit import Deadline, Throttle
from tasks.retention.report import RetentionTotals
from tasks.retention.sql_engine import SqlEngine
from tasks.settings import describe_database_url, get_settings

# Candidates read per query; batches are cut from them.
CANDIDATE_PAGE = 5_000


@asynccontextmanager
async def open_engine(choice: str, throttle: Throttle) -> AsyncIterator[RetentionEngine]:
    """The engine for `choice` ("auto", "sql" or "api"), closed on exit."""
    settings = get_settings()
    url = settings.database_url
    engine_class: type[RetentionEngine]
    database_url: SecretStr | str | None
    if choice == "sql" or (choice == "auto" and await is_reachable(url)):
        if url is None:
            raise ParameterError(
                "engine: 'sql' needs database access, and no database URL is configured "
                "(MAINTENANCE_DATABASE_URL or PREFECT_API_DATABASE_CONNECTION_URL)"
            )
        if choice == "sql" and not await is_reachable(url):
            raise ParameterError(f"engine: 'sql' but the {describe_database_url(url)} is not reachable")
        engine_class, database_url = SqlEngine, url
    else:
        # Chosen explicitly with a database at hand: it deletes what the API cannot.
        engine_class, database_url = ApiEngine, url if choice == "api" and await is_reachable(url) else None
    async with engine_class.open(database_url, throttle, settings.api_concurrency) as opened:
        yield opened


async def build_policy(
    engine: RetentionEngine, parameters: RetentionParameters, now: datetime | None = None
) -> RetentionPolicy:
    """The parameters resolved against what exists now; unknown names fail, naming the parameter."""
    deployment_ids = flow_ids = None
    if parameters.deployment_names:
        found = await engine.deployments_named(parameters.deployment_names)
        _require_all("deployment_names", parameters.deployment_names, found)
        deployment_ids = found.values()
    if parameters.flow_names:
        found = await engine.flows_named(parameters.flow_names)
        _require_all("flow_names", parameters.flow_names, found)
        flow_ids = found.values()
    kept_newest = (
        await engine.newest_per_deployment(parameters.keep_last_per_deployment)
        if parameters.keep_last_per_deployment
        else ()
    )
    return RetentionPolicy.from_parameters(
        parameters,
        now or datetime.now(UTC),
        deployment_ids=deployment_ids,
        flow_ids=flow_ids,
        kept_newest=kept_newest,
    )


def _require_all(parameter: str, names: tuple[str, ...], found: dict[str, object]) -> None:
    missing = [name for name in names if name not in found]
    if missing:
        raise ParameterError(f"{parameter}: nothing is named {', '.join(map(repr, missing))}")


@dataclass(frozen=True)
class Batch:
    """Expired top-level runs, and how many candidates had been read when it was cut."""

    runs: list[RunRecord]
    candidates_read: int


async def expired_batches(
    engine: RetentionEngine, policy: RetentionPolicy, batch_size: int
) -> AsyncIterator[Batch]:
    """Batches of `batch_size` top-level runs that the policy selects, oldest first."""
    pending: list[RunRecord] = []
    read = 0
    async for page in engine.candidates(policy, max(batch_size, CANDIDATE_PAGE)):
        read += len(page)
        pending += [run for run in page if policy.selects(run)]
        while len(pending) >= batch_size:
            yield Batch(pending[:batch_size], read)
            pending = pending[batch_size:]
    if pending:
        yield Batch(pending, read)


async def count_expired_runs(parameters: RetentionParameters | None = None) -> int:
    """How many flow runs (subflows included) retention with these parameters would delete now.

    Read-only; uses the database when one is configured and reachable, else the API.
    With no parameters, the flow's defaults.
    """
    return (await _dry_run(parameters or RetentionParameters(), Deadline(None))).totals.flow_runs


@dataclass(frozen=True)
class DryRunTotals:
    """What a dry run counted before `complete` or its deadline; how many top-level runs it
    walked, of how many candidates; whether its engine measures the space of rows."""

    totals: RetentionTotals
    top_level_runs: int
    candidates: int
    complete: bool
    measures_space: bool


async def _dry_run(parameters: RetentionParameters, deadline: Deadline) -> DryRunTotals:
    """The flow's batches in a dry run, stopped at a batch boundary once `deadline` has passed."""
    async with open_engine(parameters.engine, Throttle(0)) as engine:
        policy = await build_policy(engine, parameters)
        candidates = await engine.count_candidates(policy)
        totals = RetentionTotals()
        walked = 0
        async for batch in expired_batches(engine, policy, parameters.batch_size):
            if deadline.passed:
                return DryRunTotals(totals, walked, candidates, False, engine.measures_space)
            totals.add(await engine.process_batch(batch.runs, policy, dry_run=True))
            walked += len(batch.runs)
        return DryRunTotals(totals, walked, candidates, True, engine.measures_space)


async def measure_expired_space(
    seconds: float, parameters: RetentionParameters | None = None
) -> DryRunTotals:
    """A dry run for the space the rows of expired runs take, as the flow's dry run measures
    it, walking batches for at most about `seconds` (the rest is then not measured)."""
    return await _dry_run(parameters or RetentionParameters(), Deadline(seconds / 60))


async def count_expired_top_level_runs(parameters: RetentionParameters | None = None) -> int:
    """How many top-level flow runs are past retention with these parameters, by one count
    query (one per API filter without database access): quick on any database.

    The same candidates the flow walks (its progress counts against this number). Exact for
    policies the database decides alone, as the defaults are; with `tags`, `exclude_tags`,
    `keep_last_per_deployment` or `per_state_days` an upper bound. Subflows, which go with
    their top-level run, are not counted; `count_expired_runs` counts exactly, by walking.
    """
    parameters = parameters or RetentionParameters()
    async with open_engine(parameters.engine, Throttle(0)) as engine:
        return await engine.count_candidates(await build_policy(engine, parameters))
