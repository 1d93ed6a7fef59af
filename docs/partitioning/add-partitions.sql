\set ON_ERROR_STOP on
SET TIME ZONE 'UTC';
-- Daily partitions of events and event_resources up to 7 days ahead, each day after the
-- newest partition there is. Run it every day (cron, or a deployment of your own): an event
-- whose day has no partition goes to the default partition, and PostgreSQL then refuses to
-- make that day's partition until those rows are moved out of the default one.
SELECT format(
    'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
    newest.parent || '_' || to_char(day, 'YYYYMMDD'), newest.parent, day, day + 1
)
FROM (
    SELECT parent.relname AS parent,
           max(substring(pg_get_expr(child.relpartbound, child.oid) FROM 'TO \(''([^'']+)''\)')::timestamptz)::date AS upper_bound
    FROM pg_inherits
    JOIN pg_class parent ON parent.oid = pg_inherits.inhparent
    JOIN pg_class child ON child.oid = pg_inherits.inhrelid
    WHERE parent.relname IN ('events', 'event_resources')
    GROUP BY parent.relname
) AS newest,
LATERAL (
    SELECT moment::date AS day
    FROM generate_series(newest.upper_bound, current_date + 6, interval '1 day') AS moment
) AS days
ORDER BY newest.parent, day
\gexec
