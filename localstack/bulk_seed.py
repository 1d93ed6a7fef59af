"""Bulk-seed a PostgreSQL-backed Prefect database with N realistic finished runs.

For benchmarks: each run gets two flow run states, three task runs with two states each,
five logs, one artifact (every tenth keyed, with its collection row) and two events with
their resources, spread evenly over an age range. The flow and deployments are created
through the API; the rows are written with set-based SQL in chunks, with foreign-key
triggers off for the load (`session_replication_role = replica`), which needs a superuser:
this is for benchmark databases only.

    python -m localstack.bulk_seed --runs 100000
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import text

from tasks.database import connect
from tasks.prefect_api import call, prefect_client

TASK_RUNS_PER_RUN = 3
LOGS_PER_RUN = 5
EVENTS_PER_RUN = 2

_CHUNK_SQL = [
    # One row per run with everything the other statements derive from it.
    """
    CREATE TEMP TABLE bulk_chunk ON COMMIT DROP AS
    SELECT gen_random_uuid() AS id,
           gen_random_uuid() AS running_state_id,
           gen_random_uuid() AS final_state_id,
           CAST(:first AS bigint) + i AS number,
           (CAST(:deployment_ids AS uuid[]))[1 + (i % cardinality(CAST(:deployment_ids AS uuid[])))] AS deployment_id,
           CASE WHEN i % 50 = 0 THEN 'CRASHED' WHEN i % 33 = 0 THEN 'CANCELLED'
                WHEN i % 10 = 0 THEN 'FAILED' ELSE 'COMPLETED' END::state_type AS state_type,
           now() - make_interval(secs => (CAST(:min_age AS float8) + (CAST(:max_age AS float8) - CAST(:min_age AS float8)) * ((CAST(:first AS bigint) + i) % CAST(:total AS bigint))::float8 / CAST(:total AS bigint)) * 86400)
               AS end_time
    FROM generate_series(0, CAST(:size AS int) - 1) AS i
    """,
    """
    INSERT INTO flow_run (id, created, updated, name, state_type, state_name, state_id, state_timestamp,
                          run_count, expected_start_time, start_time, end_time, total_run_time, flow_id,
                          deployment_id, tags, work_queue_name, empirical_policy)
    SELECT id, end_time - interval '70 seconds', end_time, CAST(:prefix AS text) || '-run-' || number, state_type,
           initcap(state_type::text), final_state_id, end_time, 1, end_time - interval '65 seconds',
           end_time - interval '60 seconds', end_time, interval '60 seconds', CAST(:flow_id AS uuid), deployment_id,
           jsonb_build_array(CAST(:prefix AS text), 'team-' || (number % 3)), 'default', '{}'::jsonb
    FROM bulk_chunk
    """,
    """
    INSERT INTO flow_run_state (id, created, updated, type, timestamp, name, flow_run_id, state_details)
    SELECT running_state_id, end_time - interval '60 seconds', end_time - interval '60 seconds', 'RUNNING'::state_type,
           end_time - interval '60 seconds', 'Running', id, '{}'::jsonb FROM bulk_chunk
    UNION ALL
    SELECT final_state_id, end_time, end_time, state_type, end_time, initcap(state_type::text), id,
           '{}'::jsonb FROM bulk_chunk
    """,
    """
    CREATE TEMP TABLE bulk_task_runs ON COMMIT DROP AS
    SELECT gen_random_uuid() AS id, gen_random_uuid() AS running_state_id,
           gen_random_uuid() AS final_state_id, c.id AS flow_run_id, c.number, k, c.end_time
    FROM bulk_chunk c CROSS JOIN generate_series(1, CAST(:task_runs AS int)) AS k
    """,
    """
    INSERT INTO task_run (id, created, updated, name, state_type, state_name, state_id, state_timestamp,
                          run_count, expected_start_time, start_time, end_time, total_run_time, task_key,
                          dynamic_key, flow_run_id, empirical_policy, task_inputs, tags)
    SELECT id, end_time - interval '50 seconds', end_time, 'task-' || k || '-' || number, 'COMPLETED',
           'Completed', final_state_id, end_time - interval '5 seconds', 1, end_time - interval '50 seconds',
           end_time - interval '45 seconds', end_time - interval '5 seconds', interval '40 seconds',
           'bulk-task-' || k, number::text, flow_run_id, '{}'::jsonb, '{}'::jsonb, '[]'::jsonb
    FROM bulk_task_runs
    """,
    """
    INSERT INTO task_run_state (id, created, updated, type, timestamp, name, task_run_id, state_details)
    SELECT running_state_id, end_time - interval '45 seconds', end_time - interval '45 seconds', 'RUNNING'::state_type,
           end_time - interval '45 seconds', 'Running', id, '{}'::jsonb FROM bulk_task_runs
    UNION ALL
    SELECT final_state_id, end_time - interval '5 seconds', end_time - interval '5 seconds', 'COMPLETED'::state_type,
           end_time - interval '5 seconds', 'Completed', id, '{}'::jsonb FROM bulk_task_runs
    """,
    """
    INSERT INTO log (created, updated, name, level, flow_run_id, task_run_id, message, timestamp)
    SELECT t.end_time, t.end_time, 'prefect.task_runs', 20, t.flow_run_id, t.id,
           'Finished in state Completed() after processing batch ' || t.number || '/' || t.k
               || ' with a message long enough to look like a real log line', t.end_time
    FROM bulk_task_runs t
    UNION ALL
    SELECT c.end_time, c.end_time, 'prefect.flow_runs', 20, c.id, NULL,
           'Flow run ' || c.number || ' line ' || n || ': beginning, doing and ending its work', c.end_time
    FROM bulk_chunk c CROSS JOIN generate_series(1, CAST(:flow_logs AS int)) AS n
    """,
    """
    INSERT INTO artifact (created, updated, key, type, data, flow_run_id, description)
    SELECT end_time, end_time, CASE WHEN number % 10 = 0 THEN CAST(:prefix AS text) || '-report-' || (number % 50) END,
           'markdown', to_json('# Report of run ' || number), id, 'run summary'
    FROM bulk_chunk
    """,
    """
    INSERT INTO artifact_collection (created, updated, key, latest_id, flow_run_id, type, data, description)
    SELECT DISTINCT ON (a.key) a.created, a.created, a.key, a.id, a.flow_run_id, a.type, a.data, a.description
    FROM artifact a JOIN bulk_chunk c ON c.id = a.flow_run_id
    WHERE a.key IS NOT NULL
    ORDER BY a.key, a.created DESC
    ON CONFLICT (key) DO UPDATE SET latest_id = EXCLUDED.latest_id, flow_run_id = EXCLUDED.flow_run_id,
        updated = EXCLUDED.updated
        WHERE artifact_collection.updated < EXCLUDED.updated
    """,
    """
    CREATE TEMP TABLE bulk_events ON COMMIT DROP AS
    SELECT gen_random_uuid() AS id, c.id AS flow_run_id, c.deployment_id, c.number,
           CASE WHEN e = 1 THEN 'prefect.flow-run.Running' ELSE 'prefect.flow-run.' || initcap(c.state_type::text) END
               AS event,
           c.end_time - make_interval(secs => 60 * (2 - e)) AS occurred
    FROM bulk_chunk c CROSS JOIN generate_series(1, CAST(:events AS int)) AS e
    """,
    """
    INSERT INTO events (id, occurred, event, resource_id, resource, related_resource_ids, related, payload,
                        received, recorded)
    SELECT id, occurred, event, 'prefect.flow-run.' || flow_run_id,
           jsonb_build_object('prefect.resource.id', 'prefect.flow-run.' || flow_run_id,
                              'prefect.resource.name', CAST(:prefix AS text) || '-run-' || number),
           jsonb_build_array('prefect.flow.' || CAST(:flow_id AS text), 'prefect.deployment.' || deployment_id),
           jsonb_build_array(
               jsonb_build_object('prefect.resource.id', 'prefect.flow.' || CAST(:flow_id AS text), 'prefect.resource.role', 'flow'),
               jsonb_build_object('prefect.resource.id', 'prefect.deployment.' || deployment_id,
                                  'prefect.resource.role', 'deployment')),
           '{}'::jsonb, occurred, occurred
    FROM bulk_events
    """,
    """
    INSERT INTO event_resources (occurred, resource_id, resource_role, resource, event_id)
    SELECT occurred, 'prefect.flow.' || CAST(:flow_id AS text), 'flow',
           json_build_object('prefect.resource.id', 'prefect.flow.' || CAST(:flow_id AS text), 'prefect.resource.role', 'flow'), id
    FROM bulk_events
    UNION ALL
    SELECT occurred, 'prefect.deployment.' || deployment_id, 'deployment',
           json_build_object('prefect.resource.id', 'prefect.deployment.' || deployment_id,
                             'prefect.resource.role', 'deployment'), id
    FROM bulk_events
    """,
]


@dataclass
class BulkSeedResult:
    runs: int
    seconds: float
    flow_id: uuid.UUID
    deployment_ids: list[uuid.UUID]
    flow_name: str

    @property
    def runs_per_second(self) -> float:
        return self.runs / self.seconds if self.seconds else 0.0


async def _create_flow_and_deployments(prefix: str, deployments: int) -> tuple[uuid.UUID, list[uuid.UUID]]:
    async with prefect_client() as client:
        flow = await call(client, "POST", "/flows/", json={"name": f"{prefix}-flow"})
        deployment_ids = []
        for index in range(deployments):
            row = await call(
                client,
                "POST",
                "/deployments/",
                json={"name": f"{prefix}-deployment-{index}", "flow_id": flow["id"], "paused": True},
            )
            deployment_ids.append(uuid.UUID(row["id"]))
    return uuid.UUID(flow["id"]), deployment_ids


async def bulk_seed(
    database_url: str,
    runs: int,
    *,
    prefix: str = "bulk",
    min_age_days: float = 1.0,
    max_age_days: float = 400.0,
    deployments: int = 4,
    chunk_size: int = 20_000,
    analyze: bool = True,
) -> BulkSeedResult:
    """Write `runs` finished runs aged evenly between `min_age_days` and `max_age_days`."""
    started = time.perf_counter()
    flow_id, deployment_ids = await _create_flow_and_deployments(prefix, deployments)
    async with connect(database_url, statement_timeout_seconds=3600) as connection:
        for first in range(0, runs, chunk_size):
            size = min(chunk_size, runs - first)
            params = {
                "first": first,
                "size": size,
                "total": max(runs, 1),
                "min_age": min_age_days,
                "max_age": max_age_days,
                "prefix": prefix,
                "flow_id": str(flow_id),
                "deployment_ids": [str(i) for i in deployment_ids],
                "task_runs": TASK_RUNS_PER_RUN,
                "flow_logs": LOGS_PER_RUN - TASK_RUNS_PER_RUN,
                "events": EVENTS_PER_RUN,
            }
            await connection.execute(text("SET LOCAL session_replication_role = replica"))
            for statement in _CHUNK_SQL:
                used = {key: value for key, value in params.items() if f":{key}" in statement}
                await connection.execute(text(statement), used)
            await connection.commit()
        if analyze:
            await connection.commit()
            autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
            await autocommit.execute(
                text(
                    "ANALYZE flow_run, flow_run_state, task_run, task_run_state, log, artifact, "
                    "artifact_collection, events, event_resources"
                )
            )
    return BulkSeedResult(
        runs=runs,
        seconds=time.perf_counter() - started,
        flow_id=flow_id,
        deployment_ids=deployment_ids,
        flow_name=f"{prefix}-flow",
    )


def main(argv: list[str] | None = None) -> int:
    from tasks.settings import get_settings

    parser = argparse.ArgumentParser(
        prog="python -m localstack.bulk_seed", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--prefix", default="bulk")
    parser.add_argument("--min-age-days", type=float, default=1.0)
    parser.add_argument("--max-age-days", type=float, default=400.0)
    args = parser.parse_args(argv)
    settings = get_settings()
    if settings.database_url is None:
        raise SystemExit("set MAINTENANCE_DATABASE_URL to the Prefect database")
    result = asyncio.run(
        bulk_seed(
            settings.database_url.get_secret_value(),
            args.runs,
            prefix=args.prefix,
            min_age_days=args.min_age_days,
            max_age_days=args.max_age_days,
        )
    )
    print(f"seeded {result.runs:,} runs in {result.seconds:.1f} s ({result.runs_per_second:,.0f} runs/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
