\set ON_ERROR_STOP on
SET TIME ZONE 'UTC';
-- Before a Prefect upgrade that adds an index to a partitioned table: make it first,
-- under the migration's own name. The migration's CREATE INDEX CONCURRENTLY IF NOT EXISTS
-- then finds it and skips (PostgreSQL cannot build an index concurrently on a partitioned
-- table). Online: each partition concurrently, then the parent's index, which adopts them.
SELECT format('CREATE INDEX CONCURRENTLY IF NOT EXISTS %I ON %I (%s)', partition.relname || '__' || wanted.suffix, partition.relname, wanted.columns)
FROM (VALUES ('ix_event_resources__occurred', 'occurred', 'occurred'),
             ('ix_event_resources__event_id', 'event_id', 'event_id')) AS wanted(name, suffix, columns),
     pg_inherits JOIN pg_class partition ON partition.oid = pg_inherits.inhrelid
WHERE pg_inherits.inhparent = 'event_resources'::regclass
\gexec
CREATE INDEX IF NOT EXISTS ix_event_resources__occurred ON ONLY event_resources (occurred);
CREATE INDEX IF NOT EXISTS ix_event_resources__event_id ON ONLY event_resources (event_id);
SELECT format('ALTER INDEX %I ATTACH PARTITION %I', wanted.name, partition.relname || '__' || wanted.suffix)
FROM (VALUES ('ix_event_resources__occurred', 'occurred'), ('ix_event_resources__event_id', 'event_id')) AS wanted(name, suffix),
     pg_inherits JOIN pg_class partition ON partition.oid = pg_inherits.inhrelid
WHERE pg_inherits.inhparent = 'event_resources'::regclass
\gexec
