"""Whole partitions of `events` and `event_resources` past the retention age, dropped.

Part of the SQL engine's housekeeping: on a database whose event tables are partitioned by
time (`docs/scale.md`: daily range partitions on `occurred`), a partition whose every row is
past the age goes in one `DETACH` and `DROP`, a file unlinked in about a second whatever its
rows, with no dead rows left to vacuum. What the dropped partitions do not cover (the
partition that straddles the age, the default partition, one that could not be detached)
is then deleted row by row like on any table. On a table that is not partitioned, or on
SQLite, nothing here does anything.

`DETACH PARTITION` takes the parent's lock for a moment (`CONCURRENTLY` is not allowed
beside a default partition). Each drop is its own transaction under the maintenance
`lock_timeout`, so Prefect's event writes never wait behind it for longer than that; a
parent that stays busy (or a role that does not own the partitions) keeps its partitions,
and their rows go row by row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from pydantic import BaseModel

from tasks.retention.sql_database import PrefectDatabase, first_line

PARTITIONED_TABLES = ("events", "event_resources")
# Why a partition stays, for the errors a drop is expected to meet (any other is named by
# its first line): lock not available (lock_timeout), not the owner.
KEPT_SQLSTATES = {"55P03": "busy (lock_timeout reached)", "42501": "not owned by the maintenance role"}
# Each plain-table partition of a parent range-partitioned on `occurred` alone, with the end
# of its range (NULL for the default partition and for `TO (MAXVALUE)`: never dropped).
# PostgreSQL prints the bound in the session's time zone and reads it back the same way.
PARTITIONS_SQL = r"""
SELECT parent.oid::regclass::text AS parent,
       child.oid::regclass::text AS partition,
       substring(pg_get_expr(child.relpartbound, child.oid) FROM 'TO \(''([^'']+)''\)')::timestamptz AS up_to,
       CASE WHEN child.reltuples >= 0 THEN child.reltuples::bigint END AS rows_estimated,
       pg_total_relation_size(child.oid) AS bytes
FROM pg_partitioned_table AS partitioned
JOIN pg_class AS parent ON parent.oid = partitioned.partrelid
JOIN pg_attribute AS key ON key.attrelid = parent.oid AND key.attnum = partitioned.partattrs[0]
JOIN pg_inherits ON pg_inherits.inhparent = parent.oid
JOIN pg_class AS child ON child.oid = pg_inherits.inhrelid
WHERE parent.oid IN (to_regclass('events'), to_regclass('event_resources'))
  AND partitioned.partstrat = 'r' AND partitioned.partnatts = 1 AND key.attname = 'occurred'
  AND child.relkind = 'r'
ORDER BY parent, up_to
"""


class DroppedPartition(BaseModel):
    """A partition whose every row was past the age: dropped whole (or, in a dry run, would be)."""

    table: str
    partition: str
    up_to: datetime
    # The planner's count (`pg_class.reltuples`, kept by ANALYZE); None: never analysed.
    rows_estimated: int | None
    bytes: int


@dataclass
class PartitionDrops:
    """The partitions dropped (or that a real run would drop), and those kept and why."""

    dropped: list[DroppedPartition] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def events_covered_up_to(self) -> datetime | None:
        """Where the dropped `events` partitions end: every event before it is in one of them.
        None when no events partition is dropped."""
        ends = [partition.up_to for partition in self.dropped if partition.table == "events"]
        return max(ends) if ends else None

    def notes(self) -> list[str]:
        return [
            f"Partition {partition} was kept ({reason}): its old rows were deleted row by row."
            for partition, reason in self.kept.items()
        ]


async def drop_old_partitions(
    database: PrefectDatabase, older_than: datetime | None, *, dry_run: bool
) -> PartitionDrops:
    """Every partition of the event tables whose range ends at or before `older_than`, oldest
    first, each in its own transaction; the first that cannot be detached keeps its parent's
    newer ones too (the partitions dropped always end where the row deletes begin)."""
    drops = PartitionDrops()
    if older_than is None or database.dialect != "postgresql":
        return drops
    candidates = [
        DroppedPartition(
            table=row.parent,
            partition=row.partition,
            up_to=row.up_to,
            rows_estimated=row.rows_estimated,
            bytes=row.bytes,
        )
        for row in await database.read(sa.text(PARTITIONS_SQL))
        if row.up_to is not None and row.up_to <= older_than
    ]
    busy_tables: set[str] = set()
    for candidate in candidates:
        if candidate.table in busy_tables:
            continue
        if not dry_run:
            reason = await _detach_and_drop(database, candidate)
            if reason is not None:
                drops.kept[candidate.partition] = reason
                busy_tables.add(candidate.table)
                continue
        drops.dropped.append(candidate)
    return drops


async def _detach_and_drop(database: PrefectDatabase, partition: DroppedPartition) -> str | None:
    """None when the partition is gone; else why it stays."""
    try:
        async with database.transaction(write=True) as connection:
            # Both names come from the catalog, quoted by PostgreSQL where they need it (`regclass::text`).
            await connection.exec_driver_sql(
                f"ALTER TABLE {partition.table} DETACH PARTITION {partition.partition}"
            )
            await connection.exec_driver_sql(f"DROP TABLE {partition.partition}")
    except sa.exc.DBAPIError as error:
        # Rolled back: the partition is whole. Its rows are then deleted row by row.
        known = KEPT_SQLSTATES.get(getattr(error.orig, "sqlstate", None) or "")
        return known or first_line(error)
    return None
