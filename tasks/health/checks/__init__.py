"""The catalog of health checks, by topic; `CHECKS` is the order the report runs and lists them.

- `tables`: table bloat, dead rows, autovacuum (off, stale, due);
- `indexes`: index bloat, unused, duplicate and invalid indexes, foreign keys without one;
- `prefect_indexes`: the indexes a later Prefect migration adds that this database lacks;
- `sessions`: connections, idle and long transactions, blocked queries, locks, deadlocks,
  what holds the xmin horizon;
- `wraparound`: transaction-ID wraparound and sequences near their maximum;
- `sqlite_file`: free pages in a SQLite database file;
- `prefect_backlog`: runs past retention, stuck runs, concurrency slots, events, and
  Prefect's own cleanup settings.

Each topic module holds its checks' records, each beside its SQL or selection; the machinery
that runs them is `tasks.health.framework`.
"""

from __future__ import annotations

from tasks.health.checks import (
    indexes,
    prefect_backlog,
    prefect_indexes,
    sessions,
    sqlite_file,
    tables,
    wraparound,
)
from tasks.health.framework import Check

CHECKS: tuple[Check, ...] = (
    *tables.CHECKS,
    *indexes.CHECKS,
    *prefect_indexes.CHECKS,
    *sessions.CHECKS,
    *wraparound.CHECKS,
    *sqlite_file.CHECKS,
    *prefect_backlog.CHECKS,
)
