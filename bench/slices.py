"""Slices of one benchmark database: each method deletes its own, comparable share.

Every slice is written by `localstack.bulk_seed` under its own prefix, so it has its own
flow and deployments (a method restricts itself to its slice by deployment id) and the
same rows per run as every other slice. Ages: deletable slices are 40-290 days old, except
the slice of the method that selects by age alone (Prefect's `db_vacuum`), which is 300-400
days old, so that its retention period selects exactly that slice. The runs no method
may delete (`kept`, 1-30 days old) stay in the database throughout, as in real life.

To count what each method deleted and what it left behind, the ids of every slice's flow
runs, task runs and artifacts are recorded in a `bench` schema before anything runs; a
row whose flow run is gone but which is still there is an orphan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from sqlalchemy import bindparam, text

from localstack.bulk_seed import bulk_seed
from tasks.database import connect

KEPT = "kept"
DELETABLE_AGES_DAYS = (40.0, 290.0)
OLDEST_AGES_DAYS = (300.0, 400.0)
KEPT_AGES_DAYS = (1.0, 30.0)
# Every method deletes runs older than this; all deletable slices are older, the kept runs younger.
OLDER_THAN_DAYS = 35.0
# The age-only selection of the oldest slice: between the deletable slices and it.
OLDEST_SLICE_CUTOFF_DAYS = 295.0
# Settling after each method can run for minutes on a large database.
SLOW_STATEMENT_TIMEOUT_SECONDS = 3600


@dataclass(frozen=True)
class OwnedTable:
    """A table whose rows belong to a flow run: `column` holds the id of a recorded row of `kind`."""

    table: str
    column: str
    kind: str


OWNED_TABLES = (
    OwnedTable("flow_run", "id", "flow_run"),
    OwnedTable("flow_run_state", "flow_run_id", "flow_run"),
    OwnedTable("task_run", "flow_run_id", "flow_run"),
    OwnedTable("task_run_state", "task_run_id", "task_run"),
    OwnedTable("log", "flow_run_id", "flow_run"),
    OwnedTable("artifact", "flow_run_id", "flow_run"),
    # The collection row of an artifact key points at its latest artifact.
    OwnedTable("artifact_collection", "latest_id", "artifact"),
)
OWNED_TABLE_NAMES = tuple(owned.table for owned in OWNED_TABLES)

_RECORDS = """
CREATE SCHEMA IF NOT EXISTS bench;
CREATE TABLE IF NOT EXISTS bench.slice_row (
    method text NOT NULL,
    kind text NOT NULL,
    id uuid NOT NULL,
    flow_run_id uuid NOT NULL,
    state_type text,
    PRIMARY KEY (kind, id)
);
CREATE INDEX IF NOT EXISTS slice_row_method ON bench.slice_row (method, kind);
"""

_RECORD_SLICE = (
    """
    INSERT INTO bench.slice_row (method, kind, id, flow_run_id, state_type)
    SELECT :method, 'flow_run', id, id, state_type::text FROM flow_run WHERE flow_id = :flow_id
    """,
    """
    INSERT INTO bench.slice_row (method, kind, id, flow_run_id)
    SELECT :method, 'task_run', t.id, t.flow_run_id
    FROM task_run t JOIN flow_run f ON f.id = t.flow_run_id WHERE f.flow_id = :flow_id
    """,
    """
    INSERT INTO bench.slice_row (method, kind, id, flow_run_id)
    SELECT :method, 'artifact', a.id, a.flow_run_id
    FROM artifact a JOIN flow_run f ON f.id = a.flow_run_id WHERE f.flow_id = :flow_id
    """,
)


@dataclass(frozen=True)
class Slice:
    """One method's share of the database."""

    method: str
    runs: int
    flow_id: UUID
    flow_name: str
    deployment_ids: tuple[UUID, ...]

    def api_filter(self, states: tuple[str, ...], older_than_days: float) -> dict[str, object]:
        """The `flow_runs` filter of the API that selects this slice's expired runs in `states`."""
        cutoff = datetime.now(UTC) - timedelta(days=older_than_days)
        return {
            "deployment_id": {"any_": [str(deployment_id) for deployment_id in self.deployment_ids]},
            "state": {"type": {"any_": list(states)}},
            "end_time": {"before_": cutoff.isoformat()},
        }


async def seed_slices(
    database_url: str, sizes: Mapping[str, int], *, oldest: str | None, kept: int
) -> dict[str, Slice]:
    """Seed one slice per method (`oldest` gets the oldest ages) and the kept runs; record them."""
    slices = {}
    plan = [(method, runs) for method, runs in sizes.items() if runs > 0] + [(KEPT, kept)]
    for method, runs in plan:
        if method == KEPT:
            ages = KEPT_AGES_DAYS
        elif method == oldest:
            ages = OLDEST_AGES_DAYS
        else:
            ages = DELETABLE_AGES_DAYS
        result = await bulk_seed(
            database_url,
            runs,
            prefix=f"bench-{method.replace('_', '-')}",
            min_age_days=ages[0],
            max_age_days=ages[1],
            analyze=False,
        )
        slices[method] = Slice(
            method=method,
            runs=runs,
            flow_id=result.flow_id,
            flow_name=result.flow_name,
            deployment_ids=tuple(result.deployment_ids),
        )
    async with connect(database_url, statement_timeout_seconds=SLOW_STATEMENT_TIMEOUT_SECONDS) as connection:
        for statement in _RECORDS.split(";"):
            if statement.strip():
                await connection.execute(text(statement))
        for method, slice_ in slices.items():
            for statement in _RECORD_SLICE:
                await connection.execute(text(statement), {"method": method, "flow_id": str(slice_.flow_id)})
        await connection.commit()
    await settle(database_url)
    return slices


async def settle(
    database_url: str, tables: tuple[str, ...] = (*OWNED_TABLE_NAMES, "bench.slice_row")
) -> None:
    """Vacuum and analyse the tables (the owned ones by default) and checkpoint, so each method starts alike.

    Without it a method would pay for the dead rows its predecessor left (or profit from
    their absence after autovacuum), depending on the order the methods ran in.
    """
    async with connect(database_url, statement_timeout_seconds=SLOW_STATEMENT_TIMEOUT_SECONDS) as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(text(f"VACUUM (ANALYZE) {', '.join(tables)}"))
        await autocommit.execute(text("CHECKPOINT"))


@dataclass(frozen=True)
class SliceCount:
    """Rows of a slice per owned table, and how many of them have lost their flow run."""

    rows: dict[str, int]
    orphans: dict[str, int]

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def total_orphans(self) -> int:
        return sum(self.orphans.values())


async def count_slice(database_url: str, method: str) -> SliceCount:
    rows, orphans = {}, {}
    async with connect(database_url, statement_timeout_seconds=SLOW_STATEMENT_TIMEOUT_SECONDS) as connection:
        for owned in OWNED_TABLES:
            statement = text(
                f"""
                SELECT count(*),
                       count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM flow_run f WHERE f.id = s.flow_run_id))
                FROM {owned.table} t JOIN bench.slice_row s ON s.kind = :kind AND s.id = t.{owned.column}
                WHERE s.method = :method
                """
            )
            total, orphaned = (
                await connection.execute(statement, {"kind": owned.kind, "method": method})
            ).one()
            rows[owned.table] = total
            orphans[owned.table] = orphaned
    return SliceCount(rows=rows, orphans=orphans)


async def runs_in_states(database_url: str, method: str, states: tuple[str, ...]) -> int:
    """How many of the slice's flow runs were seeded in `states`: what the method should delete."""
    statement = text(
        "SELECT count(*) FROM bench.slice_row WHERE method = :method AND kind = 'flow_run' AND state_type IN :states"
    ).bindparams(bindparam("states", expanding=True))
    async with connect(database_url) as connection:
        return (await connection.execute(statement, {"method": method, "states": list(states)})).scalar_one()
