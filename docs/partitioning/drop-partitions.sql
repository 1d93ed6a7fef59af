\set ON_ERROR_STOP on
SET TIME ZONE 'UTC';
-- Detach and drop every partition of events and event_resources whose rows are all older
-- than :days days (psql -v days=7): the space goes back to the file system at once, with no
-- DELETE, no dead rows and no VACUUM. The default partition is never dropped. DETACH takes
-- a lock on the parent for a moment (CONCURRENTLY is not allowed beside a default
-- partition): the lock timeout keeps Prefect's event writes from queueing behind it.
SET lock_timeout = '5s';
SELECT format('ALTER TABLE %I DETACH PARTITION %I', parent.relname, child.relname),
       format('DROP TABLE %I', child.relname)
FROM pg_inherits
JOIN pg_class parent ON parent.oid = pg_inherits.inhparent
JOIN pg_class child ON child.oid = pg_inherits.inhrelid
CROSS JOIN LATERAL (
    SELECT substring(pg_get_expr(child.relpartbound, child.oid) FROM 'TO \(''([^'']+)''\)')::timestamptz AS upper_bound
) AS bound
WHERE parent.relname IN ('events', 'event_resources')
  AND bound.upper_bound <= now() - make_interval(days => :days)
ORDER BY bound.upper_bound
\gexec
