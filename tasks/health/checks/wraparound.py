"""Checks on what runs out: transaction and multixact IDs (wraparound, for every database of
the cluster) and sequences near the maximum of their type or of the column they feed.
"""

from __future__ import annotations

from tasks.health.framework import AboveThreshold, Check, sql

# Wraparound is per cluster: every database that accepts connections counts.
WRAPAROUND_SQL = """
WITH oldest AS (
    SELECT string_agg(name, ', ') AS tables FROM (
        SELECT c.oid::regclass::text AS name FROM pg_class AS c
        WHERE c.relkind IN ('r', 'm', 't') AND c.relfrozenxid <> '0'
        ORDER BY age(c.relfrozenxid) DESC LIMIT 3
    ) AS top
)
SELECT d.datname || ' (transaction IDs)' AS object,
       round(100.0 * age(d.datfrozenxid) / current_setting('autovacuum_freeze_max_age')::numeric, 1)::float8
           AS value,
       age(d.datfrozenxid) AS age,
       CASE WHEN d.datname = current_database() THEN oldest.tables ELSE 'the oldest tables of ' || d.datname
       END AS oldest_tables
FROM pg_database AS d CROSS JOIN oldest
WHERE d.datallowconn
UNION ALL
SELECT d.datname || ' (multixact IDs)',
       round(100.0 * mxid_age(d.datminmxid)
             / current_setting('autovacuum_multixact_freeze_max_age')::numeric, 1)::float8,
       mxid_age(d.datminmxid),
       CASE WHEN d.datname = current_database() THEN oldest.tables ELSE 'the oldest tables of ' || d.datname END
FROM pg_database AS d CROSS JOIN oldest
WHERE d.datallowconn
ORDER BY value DESC
"""

WRAPAROUND = Check(
    "wraparound",
    "Transaction-ID wraparound",
    sql(WRAPAROUND_SQL),
    AboveThreshold("wraparound_percent", inclusive=True),
    "Age {age} (100% = autovacuum_freeze_max_age, when anti-wraparound vacuums start). "
    "VACUUM (FREEZE, VERBOSE) the oldest tables ({oldest_tables}) and end whatever holds the xmin horizon.",
    unit="%",
    shows="{value} of autovacuum_freeze_max_age",
)

# A sequence feeding an integer column runs out at the column's maximum, not its own.
SEQUENCES_SQL = """
SELECT quote_ident(s.schemaname) || '.' || quote_ident(s.sequencename) AS object,
       round(100.0 * s.last_value / limits.maximum, 2)::float8 AS value,
       s.last_value,
       limits.maximum
FROM pg_sequences AS s
LEFT JOIN LATERAL (
    SELECT a.atttypid::regtype::text AS column_type
    FROM pg_depend AS d
    JOIN pg_attribute AS a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
    WHERE d.objid = (quote_ident(s.schemaname) || '.' || quote_ident(s.sequencename))::regclass
      AND d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
    LIMIT 1
) AS owner ON true
CROSS JOIN LATERAL (
    SELECT least(s.max_value, CASE owner.column_type WHEN 'smallint' THEN 32767
                                                     WHEN 'integer' THEN 2147483647
                                                     ELSE s.max_value END)::numeric AS maximum
) AS limits
WHERE s.last_value IS NOT NULL AND s.increment_by > 0
ORDER BY value DESC
LIMIT 20
"""

SEQUENCES = Check(
    "sequences",
    "Sequences near their maximum",
    sql(SEQUENCES_SQL),
    AboveThreshold("sequence_percent", inclusive=True),
    "{last_value} of {maximum}. Widen the column and the sequence to bigint: "
    "ALTER SEQUENCE {object} AS bigint;",
    unit="%",
    shows="{value} of its range used",
)

CHECKS = (WRAPAROUND, SEQUENCES)
