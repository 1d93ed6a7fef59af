"""Checks for the indexes a later Prefect migration adds to a big table and a database lacks.

The run tables are the same from Prefect 3.1 to 3.9, but their indexes are not: a server
upgraded late (or a database restored from an old dump) misses indexes that make its queries
and retention's deletes scan whole tables. Each record names the index, its table, its
definition exactly as Prefect's own migration writes it, and the Prefect version (and
migration) that adds it.

Most of those migrations use `CREATE INDEX CONCURRENTLY IF NOT EXISTS`: running that same
statement now gives the database the index a later upgrade would build (same name, same
definition), and the upgrade then skips it. The 3.3.4 migration that rebuilds the events
indexes uses a plain `CREATE INDEX`: created by hand first, the index would make that upgrade
fail, so for those the advice is the upgrade itself: the records of that kind make their own
check (`indexes_awaiting_upgrade`), apart from those to create now (`missing_prefect_indexes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.health.framework import Check, EveryRow, HealthContext, Query, Row
from tasks.health.models import IndexFigures, TableFigures


@dataclass(frozen=True)
class PrefectIndex:
    name: str
    table: str
    definition: str  # what follows `ON <table>`, as the migration writes it
    added_in: str  # the first Prefect release whose migrations create it
    revision: str  # that migration's revision id
    if_not_exists: bool = True  # the migration skips an index that is already there

    @property
    def statement(self) -> str:
        return f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {self.name} ON {self.table} {self.definition};"


LATER_PREFECT_INDEXES = (
    PrefectIndex("ix_events__event_occurred", "events", "(event, occurred)", "3.3.4", "7a73514ca2d6", False),
    PrefectIndex("ix_events__related_gin", "events", "USING gin (related)", "3.3.4", "7a73514ca2d6", False),
    PrefectIndex(
        "ix_events__related_resource_ids_gin",
        "events",
        "USING gin (related_resource_ids)",
        "3.3.4",
        "7a73514ca2d6",
        False,
    ),
    PrefectIndex(
        "ix_flow_run__schedule_id_scheduler",
        "flow_run",
        "(deployment_id, (created_by->>'id'), next_scheduled_start_time) "
        "WHERE state_type = 'SCHEDULED' AND auto_scheduled = true",
        "3.6.19",
        "a1b2c3d4e5f6",
    ),
    PrefectIndex(
        "ix_task_run__state_type_start_time", "task_run", "(state_type, start_time)", "3.6.21", "09a9e091e578"
    ),
    PrefectIndex("ix_event_resources__occurred", "event_resources", "(occurred)", "3.7.5", "bad1e352c597"),
    PrefectIndex("ix_event_resources__event_id", "event_resources", "(event_id)", "3.8.0", "50737cdaee36"),
    PrefectIndex("ix_flow_run__deployment_id", "flow_run", "(deployment_id)", "3.8.4", "9e9dadc36797"),
    PrefectIndex(
        "ix_flow_run__state_type_coalesce_start_time",
        "flow_run",
        "(state_type, (coalesce(start_time, expected_start_time)))",
        "3.8.7",
        "d4a7e1c93f52",
    ),
)


def missing_indexes(
    tables: list[TableFigures], indexes: list[IndexFigures], *, if_not_exists: bool
) -> list[Row]:
    """A row per record (of the given kind) whose table is there and whose index is not."""
    table_names = {_bare(table.name) for table in tables}
    present = {(_bare(index.table), _bare(index.name)) for index in indexes}
    return [
        {
            "object": record.name,
            "value": record.table,
            "added_in": record.added_in,
            "revision": record.revision,
        }
        | ({"statement": record.statement} if record.if_not_exists else {})
        for record in LATER_PREFECT_INDEXES
        if record.if_not_exists == if_not_exists
        and record.table in table_names
        and (record.table, record.name) not in present
    ]


def _bare(name: str) -> str:
    """A relation's name without its schema (the survey qualifies names outside `public`)."""
    return name.rpartition(".")[2]


def each_missing_index(*, if_not_exists: bool) -> Query:
    """The later Prefect indexes (of one kind) the surveyed tables lack."""

    async def run(context: HealthContext) -> list[Row]:
        return missing_indexes(context.report.tables, context.report.indexes, if_not_exists=if_not_exists)

    return run


MISSING_PREFECT_INDEXES = Check(
    "missing_prefect_indexes",
    "Indexes a later Prefect adds",
    each_missing_index(if_not_exists=True),
    EveryRow("warning"),
    "Prefect {added_in} adds this index to {value} (migration {revision}); without it its queries and "
    "retention's deletes scan the table. Create it now, exactly as that migration does (the upgrade then "
    "skips it): {statement}",
    shows="missing on {value}",
)

INDEXES_AWAITING_UPGRADE = Check(
    "indexes_awaiting_upgrade",
    "Indexes the next Prefect upgrade builds",
    each_missing_index(if_not_exists=False),
    EveryRow("info"),
    "Prefect {added_in} builds this index on {value} (migration {revision}) with a plain CREATE INDEX: do "
    "not create it by hand, the upgrade would fail on it. Upgrading the server builds it (it locks "
    "{value} against writes while it does).",
    shows="missing on {value}",
)

CHECKS = (MISSING_PREFECT_INDEXES, INDEXES_AWAITING_UPGRADE)
