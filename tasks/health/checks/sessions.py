"""Checks on sessions and locks: connections against max_connections (and by client), sessions
idle in a transaction, blocked queries, long transactions, locks by mode, new deadlocks, and
what holds the xmin horizon back (sessions, inactive replication slots, old prepared
transactions).

Each asks `pg_stat_activity`, `pg_locks` and their kin once; query texts in the findings are
cut short, with literal passwords masked.
"""

from __future__ import annotations

from tasks.health.framework import (
    AboveThreshold,
    Check,
    EveryRow,
    HealthContext,
    InformationOnly,
    Row,
    sql,
)
from tasks.health.statements import rows_of

CONNECTIONS_SQL = """
SELECT 'max_connections' AS object,
       round(100.0 * count(*) / current_setting('max_connections')::int, 1)::float8 AS value,
       count(*) AS connections,
       current_setting('max_connections')::int AS max_connections
FROM pg_stat_activity
WHERE backend_type = 'client backend'
"""

CONNECTIONS = Check(
    "connections",
    "Connections",
    sql(CONNECTIONS_SQL),
    AboveThreshold("connections_percent", inclusive=True),
    "{connections} of {max_connections} connections in use (see 'Connections by client'). Each Prefect "
    "server process holds up to PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE + "
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW connections: lower them, or put PgBouncer in front.",
    unit="%",
    shows="{value} of max_connections",
)

CONNECTIONS_BY_CLIENT_SQL = """
SELECT coalesce(datname, '-') || ' / ' || coalesce(usename, '-') || ' / '
           || coalesce(nullif(application_name, ''), '-') AS object,
       count(*) AS value,
       count(*) FILTER (WHERE state = 'active') AS active,
       count(*) FILTER (WHERE state = 'idle') AS idle,
       count(*) FILTER (WHERE state LIKE 'idle in transaction%') AS idle_in_transaction
FROM pg_stat_activity
WHERE backend_type = 'client backend'
GROUP BY datname, usename, application_name
ORDER BY value DESC
LIMIT 20
"""

CONNECTIONS_BY_CLIENT = Check(
    "connections_by_client", "Connections by client", sql(CONNECTIONS_BY_CLIENT_SQL), InformationOnly()
)

# Query texts are cut short, and literal passwords (ALTER ROLE ... PASSWORD '...') masked.
_QUERY_TEXT = "regexp_replace(left({column}, 200), '(?i)(password\\s*)''[^'']*''', '\\1''***''', 'g')"

IDLE_IN_TRANSACTION_SQL = f"""
SELECT 'pid ' || pid AS object,
       pid,
       round(extract(epoch FROM now() - state_change)::numeric, 1)::float8 AS value,
       coalesce(usename, '-') AS user_name,
       coalesce(nullif(application_name, ''), '-') AS application,
       {_QUERY_TEXT.format(column="query")} AS last_query
FROM pg_stat_activity
WHERE state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()
ORDER BY value DESC
LIMIT 50
"""

IDLE_IN_TRANSACTION = Check(
    "idle_in_transaction",
    "Sessions idle in a transaction",
    sql(IDLE_IN_TRANSACTION_SQL),
    AboveThreshold("idle_in_transaction_seconds"),
    "pid {pid} ({user_name}, {application}) holds its locks and the xmin horizon, idle since: {last_query}. "
    "End it: SELECT pg_terminate_backend({pid}); prevent it: "
    "ALTER ROLE {user_name} SET idle_in_transaction_session_timeout = '5min';",
    unit="s",
    shows="{value} idle in a transaction",
)

# pg_locks.waitstart says when the wait began; pg_blocking_pids who is in the way.
BLOCKED_QUERIES_SQL = f"""
SELECT 'pid ' || waiting.pid AS object,
       waiting.pid,
       round(extract(epoch FROM now() - coalesce(lock_wait.since, waiting.query_start))::numeric, 1)::float8
           AS value,
       array_to_string(pg_blocking_pids(waiting.pid), ', ') AS blocking_pids,
       (pg_blocking_pids(waiting.pid))[1] AS first_blocking_pid,
       {_QUERY_TEXT.format(column="waiting.query")} AS query,
       coalesce((SELECT {_QUERY_TEXT.format(column="blocker.query")} || ' (' || blocker.state || ')'
                 FROM pg_stat_activity AS blocker
                 WHERE blocker.pid = (pg_blocking_pids(waiting.pid))[1]), '-') AS blocking_query
FROM pg_stat_activity AS waiting
LEFT JOIN LATERAL (
    SELECT min(waitstart) AS since FROM pg_locks WHERE pid = waiting.pid AND NOT granted
) AS lock_wait ON true
WHERE waiting.wait_event_type = 'Lock' AND cardinality(pg_blocking_pids(waiting.pid)) > 0
ORDER BY value DESC
LIMIT 50
"""

BLOCKED_QUERIES = Check(
    "blocked_queries",
    "Blocked queries",
    sql(BLOCKED_QUERIES_SQL),
    AboveThreshold("blocked_query_seconds"),
    "pid {pid} ({query}) waits for pid {blocking_pids}: {blocking_query}. If the blocker is stuck: "
    "SELECT pg_terminate_backend({first_blocking_pid});",
    unit="s",
    shows="{value} waiting for a lock",
)

LONG_TRANSACTIONS_SQL = f"""
SELECT 'pid ' || pid AS object,
       pid,
       round(extract(epoch FROM now() - xact_start)::numeric, 1)::float8 AS value,
       state,
       coalesce(usename, '-') AS user_name,
       coalesce(nullif(application_name, ''), '-') AS application,
       {_QUERY_TEXT.format(column="query")} AS query
FROM pg_stat_activity
WHERE xact_start IS NOT NULL
  AND pid <> pg_backend_pid()
  AND backend_type = 'client backend'
  AND state NOT LIKE 'idle in transaction%'
ORDER BY value DESC
LIMIT 50
"""

LONG_TRANSACTIONS = Check(
    "long_transactions",
    "Long-running transactions",
    sql(LONG_TRANSACTIONS_SQL),
    AboveThreshold("long_transaction_seconds"),
    "pid {pid} ({user_name}, {application}, {state}): {query}. It holds back vacuum everywhere; "
    "if it should not run this long: SELECT pg_cancel_backend({pid});",
    unit="s",
    shows="{value} since the transaction began",
)

LOCKS_SQL = """
SELECT locks.mode AS object,
       count(*) AS value,
       count(*) FILTER (WHERE NOT locks.granted) AS waiting,
       string_agg(DISTINCT coalesce(nullif(activity.application_name, ''), activity.backend_type, '-'), ', ')
           AS held_by
FROM pg_locks AS locks
LEFT JOIN pg_stat_activity AS activity ON activity.pid = locks.pid
WHERE locks.pid <> pg_backend_pid()
GROUP BY locks.mode
ORDER BY value DESC
"""

LOCKS = Check("locks", "Locks by mode", sql(LOCKS_SQL), InformationOnly())

DEADLOCKS_SQL = """
SELECT current_database() AS object, deadlocks, coalesce(stats_reset, pg_postmaster_start_time()) AS since
FROM pg_stat_database WHERE datname = current_database()
"""


async def _new_deadlocks(context: HealthContext) -> list[Row]:
    """Deadlocks since the previous report (all of them when there is none to compare with)."""
    row = (await rows_of(context.connection, DEADLOCKS_SQL))[0]
    total = row["deadlocks"]
    previous = context.previous.deadlocks if context.previous else None
    if previous is not None and previous <= total:
        value, window = (
            total - previous,
            f"since the previous report ({context.previous.created:%Y-%m-%d %H:%M})",
        )
    else:
        value, window = total, f"since statistics began ({row['since']:%Y-%m-%d %H:%M})"
    return [{"object": row["object"], "value": value, "total": total, "window": window}]


DEADLOCKS = Check(
    "deadlocks",
    "Deadlocks",
    _new_deadlocks,
    AboveThreshold("deadlocks"),
    "Deadlocks {window}: {value} ({total} in all). SET log_lock_waits = on and read 'deadlock detected' "
    "in the server log. Prefect workers polling one work queue deadlock on UPDATE deployment SET "
    "last_polled: run one worker per queue with a queue concurrency limit.",
    unit="new deadlock",
)

XMIN_HOLDERS_SQL = """
SELECT object, kind, value, held_since FROM (
    SELECT 'pid ' || pid AS object, 'session' AS kind, age(backend_xmin) AS value, xact_start AS held_since
    FROM pg_stat_activity WHERE backend_xmin IS NOT NULL AND pid <> pg_backend_pid()
    UNION ALL
    SELECT 'replication slot ' || slot_name, 'replication slot', greatest(age(xmin), age(catalog_xmin)), NULL
    FROM pg_replication_slots WHERE xmin IS NOT NULL OR catalog_xmin IS NOT NULL
    UNION ALL
    SELECT 'prepared transaction ' || gid, 'prepared transaction', age(transaction), prepared
    FROM pg_prepared_xacts
) AS holders
ORDER BY value DESC
LIMIT 10
"""

XMIN_HORIZON = Check("xmin_horizon", "xmin horizon holders", sql(XMIN_HOLDERS_SQL), InformationOnly())

INACTIVE_SLOTS_SQL = """
SELECT 'replication slot ' || slot_name AS object,
       slot_name,
       greatest(age(xmin), age(catalog_xmin)) AS value
FROM pg_replication_slots
WHERE NOT active AND (xmin IS NOT NULL OR catalog_xmin IS NOT NULL)
"""

INACTIVE_REPLICATION_SLOTS = Check(
    "inactive_replication_slots",
    "Inactive replication slots",
    sql(INACTIVE_SLOTS_SQL),
    EveryRow("warning"),
    "It holds the xmin horizon (transactions behind: {value}) and WAL. If nothing consumes it any more: "
    "SELECT pg_drop_replication_slot('{slot_name}');",
    unit="transaction",
    shows="{value} behind",
)

PREPARED_TRANSACTIONS_SQL = """
SELECT 'prepared transaction ' || gid AS object,
       gid,
       round(extract(epoch FROM now() - prepared)::numeric, 1)::float8 AS value
FROM pg_prepared_xacts
"""

PREPARED_TRANSACTIONS = Check(
    "prepared_transactions",
    "Old prepared transactions",
    sql(PREPARED_TRANSACTIONS_SQL),
    AboveThreshold("long_transaction_seconds"),
    "It holds locks and the xmin horizon: COMMIT PREPARED '{gid}'; or ROLLBACK PREPARED '{gid}';",
    unit="s",
    shows="{value} since it was prepared",
)

CHECKS = (
    CONNECTIONS,
    CONNECTIONS_BY_CLIENT,
    IDLE_IN_TRANSACTION,
    BLOCKED_QUERIES,
    LONG_TRANSACTIONS,
    LOCKS,
    DEADLOCKS,
    XMIN_HORIZON,
    INACTIVE_REPLICATION_SLOTS,
    PREPARED_TRANSACTIONS,
)
