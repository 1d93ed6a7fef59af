-- Least-privilege database roles for the maintenance flows, in Prefect's database.
--
--   maintenance_purge   the worker's MAINTENANCE_DATABASE_URL. Reads the run tables and
--                       deletes from them (retention's SQL engine: flow runs with
--                       everything they own, old events), locks the runs it deletes,
--                       updates the artifact collection's latest pointer, takes advisory
--                       locks (allowed to every role).
--   maintenance_report  the worker's MAINTENANCE_REPORT_DATABASE_URL, used by the health
--                       report and the stuck-run detectors. Read-only: pg_monitor (size,
--                       bloat, vacuum, locks, pgstattuple) and SELECT on the run tables.
--
-- Neither can read Prefect's blocks, variables or settings (the encryption key of the
-- block secrets lives in `configuration`), nor change a run's state: state changes go
-- through the Prefect API.
--
-- After a purge the SQL engine runs VACUUM (ANALYZE) on the tables it deleted from. VACUUM
-- needs the table's owner or, on PostgreSQL 17 and newer, the MAINTAIN privilege, which
-- this script grants on the run tables. On older servers PostgreSQL skips those tables
-- with a warning; autovacuum (or the owner, out of business hours) reclaims the space.
--
-- Run it as a superuser (rds_superuser on RDS: pgstattuple is not a trusted
-- extension) in Prefect's database, after the Prefect server has created its tables,
-- and again after a Prefect upgrade. It is idempotent. psql 15 or newer:
--
--   MAINTENANCE_PURGE_PASSWORD=... MAINTENANCE_REPORT_PASSWORD=... \
--     psql "postgresql://admin@host/prefect" -v ON_ERROR_STOP=1 -f docker/roles.sql
\set ON_ERROR_STOP on
\getenv purge_password MAINTENANCE_PURGE_PASSWORD
\getenv report_password MAINTENANCE_REPORT_PASSWORD
SELECT current_schema() AS prefect_schema \gset
SELECT current_setting('server_version_num')::int >= 170000 AS has_maintain_privilege \gset
-- The run tables: a flow run and what it owns, and the events that name it.
\set run_tables 'flow_run, flow_run_state, flow_run_input, task_run, task_run_state, task_run_state_cache, log, artifact, artifact_collection, events, event_resources'

CREATE EXTENSION IF NOT EXISTS pgstattuple;

SELECT 'CREATE ROLE maintenance_purge'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'maintenance_purge') \gexec
SELECT 'CREATE ROLE maintenance_report'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'maintenance_report') \gexec

-- A connection limit keeps maintenance from ever taking the connections user flows need.
ALTER ROLE maintenance_purge WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    CONNECTION LIMIT 8 PASSWORD :'purge_password';
ALTER ROLE maintenance_report WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    CONNECTION LIMIT 4 PASSWORD :'report_password';
ALTER ROLE maintenance_report SET default_transaction_read_only = on;
GRANT pg_monitor TO maintenance_report;

GRANT CONNECT ON DATABASE :"DBNAME" TO maintenance_purge, maintenance_report;
GRANT USAGE ON SCHEMA :"prefect_schema" TO maintenance_purge, maintenance_report;

GRANT SELECT ON :run_tables TO maintenance_purge, maintenance_report;
GRANT DELETE ON :run_tables TO maintenance_purge;
GRANT UPDATE ON artifact_collection TO maintenance_purge;
-- Selection locks the runs it is about to delete (SELECT ... FOR UPDATE SKIP LOCKED), which
-- PostgreSQL allows only with UPDATE on one column: the bookkeeping `updated` column.
GRANT UPDATE (updated) ON flow_run TO maintenance_purge;

-- What runs are selected and reported by: their flow, deployment, pool and queue; and the
-- concurrency limits whose slots reconcile and the health report compare with their runs.
GRANT SELECT ON flow, deployment, work_pool, work_queue, concurrency_limit_v2
    TO maintenance_purge, maintenance_report;

\if :has_maintain_privilege
GRANT MAINTAIN ON :run_tables TO maintenance_purge;
\endif
