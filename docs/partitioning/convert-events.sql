\set ON_ERROR_STOP on
SET TIME ZONE 'UTC';
-- The day from which new daily partitions start: the day after tomorrow (UTC), so that
-- an event stamped a little ahead by a client clock still lands in the old table.
SELECT to_char(current_date + 2, 'YYYY-MM-DD') AS cutover \gset

-- 1. Online: nothing here stops Prefect from writing events.
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS events_id_occurred ON events (id, occurred);
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS event_resources_id_occurred ON event_resources (id, occurred);
ALTER TABLE events ADD CONSTRAINT events_before_cutover CHECK (occurred < :'cutover') NOT VALID;
ALTER TABLE events VALIDATE CONSTRAINT events_before_cutover;
ALTER TABLE event_resources ADD CONSTRAINT event_resources_before_cutover CHECK (occurred < :'cutover') NOT VALID;
ALTER TABLE event_resources VALIDATE CONSTRAINT event_resources_before_cutover;

-- 2. The switch, one short transaction: each table becomes the first partition of a
-- partitioned table of the same name, with the same indexes under the same names.
BEGIN;
SET LOCAL lock_timeout = '10s';
SET LOCAL maintenance.cutover = :'cutover';
LOCK TABLE events, event_resources IN ACCESS EXCLUSIVE MODE;
DO $$
DECLARE
    parent text;
    legacy text;
    cutover date := current_setting('maintenance.cutover')::date;
    definition record;
    definitions text[];
    statement text;
BEGIN
    FOREACH parent IN ARRAY ARRAY['events', 'event_resources'] LOOP
        legacy := parent || '_before_' || to_char(cutover, 'YYYYMMDD');
        -- Prefect's own index definitions, as they stand, to be made again on the parent.
        SELECT array_agg(indexdef ORDER BY indexname) INTO definitions
        FROM pg_indexes
        WHERE schemaname = 'public' AND tablename = parent AND indexname NOT IN ('pk_' || parent, parent || '_id_occurred');
        EXECUTE format('ALTER TABLE %I RENAME TO %I', parent, legacy);
        -- Its primary key on id alone makes way for one on (id, occurred), on the unique
        -- index made in step 1 (no build): the partitioned table's primary key adopts it.
        EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', legacy, 'pk_' || parent);
        EXECUTE format(
            'ALTER TABLE %I ADD CONSTRAINT %I PRIMARY KEY USING INDEX %I', legacy, legacy || '_pk', parent || '_id_occurred'
        );
        FOR definition IN
            SELECT indexname FROM pg_indexes
            WHERE schemaname = 'public' AND tablename = legacy AND indexname NOT IN (parent || '_id_occurred', legacy || '_pk')
        LOOP
            EXECUTE format('ALTER INDEX %I RENAME TO %I', definition.indexname, 'legacy_' || definition.indexname);
        END LOOP;
        EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS) PARTITION BY RANGE (occurred)', parent, legacy);
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%L)', parent, legacy, cutover);
        -- Each index on the parent finds its twin on the old table and adopts it: no rebuild.
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I PRIMARY KEY (id, occurred)', parent, 'pk_' || parent);
        FOREACH statement IN ARRAY definitions LOOP
            EXECUTE statement;
        END LOOP;
        EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', legacy, parent || '_before_cutover');
        -- A week of daily partitions ahead (add-partitions.sql keeps it so), and a default one
        -- so that no event is ever refused.
        FOR day IN 0..6 LOOP
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                parent || '_' || to_char(cutover + day, 'YYYYMMDD'), parent, cutover + day, cutover + day + 1
            );
        END LOOP;
        EXECUTE format('CREATE TABLE %I PARTITION OF %I DEFAULT', parent || '_default', parent);
    END LOOP;
END
$$;
COMMIT;
