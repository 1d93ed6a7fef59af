"""Flow `retention`: delete finished runs past their retention age, with everything they own.

Nightly (deployment `retention/nightly`) or by hand (`retention/ad-hoc`, a dry run unless
told otherwise). In order: validate the parameters; pick the engine (SQL when the database
is reachable, else the API); resolve the policy; delete the expired runs batch by batch,
paced by the throttle and stopped at a batch boundary when `max_minutes` is up; sweep
orphans; delete old events; vacuum what was deleted from; with the API engine, wait for
the server to delete the deleted runs' logs; publish the `retention-report` artifact and
return the report. With `archive_to`, every batch is archived before its deletes.
"""

from contextlib import nullcontext
from datetime import UTC, datetime
from time import perf_counter

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from tasks.reports import publish_report, run_name
from tasks.retention.archive import BatchArchive
from tasks.retention.parameters import EngineChoice, RetentionParameters, TerminalState
from tasks.retention.purge import (
    delete_old_events,
    drop_old_partitions,
    event_rules,
    heap_frozen,
    limitations,
    purge_expired_runs,
    resolve_policy,
    sweep_orphans,
    vacuum_tables,
    wait_for_log_deletion,
)
from tasks.retention.rate_limit import Deadline, Throttle
from tasks.retention.report import RetentionReport
from tasks.retention.selection import open_engine
from tasks.settings import describe_database_url, get_settings

DEFAULTS = RetentionParameters()


class RetentionFailed(RuntimeError):
    """A batch failed even after its retries; the report says what was done before."""


@flow(name="retention", flow_run_name=run_name("retention"))
async def retention(
    older_than_days: float = DEFAULTS.older_than_days,
    states: list[TerminalState] = list(DEFAULTS.states),
    per_state_days: dict[TerminalState, float] = {},
    keep_last_per_deployment: int = DEFAULTS.keep_last_per_deployment,
    deployment_names: list[str] = [],
    flow_names: list[str] = [],
    tags: list[str] = [],
    exclude_tags: list[str] = [],
    dry_run: bool = DEFAULTS.dry_run,
    engine: EngineChoice = DEFAULTS.engine,
    batch_size: int = DEFAULTS.batch_size,
    max_runs_per_second: float | None = None,
    max_minutes: float | None = DEFAULTS.max_minutes,
    include_orphans: bool = DEFAULTS.include_orphans,
    events_older_than_days: float | None = DEFAULTS.events_older_than_days,
    heartbeat_events_older_than_days: float | None = DEFAULTS.heartbeat_events_older_than_days,
    vacuum: bool = DEFAULTS.vacuum,
    archive_to: str = DEFAULTS.archive_to,
) -> RetentionReport:
    """Delete finished flow runs past their retention age, their subflows, and what they own.

    Args:
        older_than_days: a finished run older than this is deleted (more than one hour).
            Its age counts from its end time, else its state's time, else when it was due,
            else when it was created.
        states: the terminal states to delete (COMPLETED, FAILED, CANCELLED, CRASHED;
            at least one).
        per_state_days: a different age per state, e.g. {"FAILED": 90}.
        keep_last_per_deployment: keep the newest N finished runs of every deployment,
            however old.
        deployment_names: only runs of these deployments ("flow-name/deployment-name").
        flow_names: only runs of these flows.
        tags: only runs carrying one of these tags.
        exclude_tags: a run carrying one of these tags is never deleted (nor its tree).
        dry_run: count exactly what would be deleted, per state, deployment and flow,
            and change nothing.
        engine: "sql" deletes in the database directly (fast; needs its URL), "api"
            through the Prefect API (Prefect Cloud, no database access), "auto" picks
            "sql" when the database is configured and reachable.
        batch_size: top-level runs per batch, each batch one short transaction (1-10,000).
        max_runs_per_second: pace of deletion; 0: no limit; empty: the worker's default
            (MAINTENANCE_MAX_RUNS_PER_SECOND, 500). Slows down by itself when batches
            get slow or the API pushes back.
        max_minutes: stop at the next batch boundary after this long and report what
            remains; empty: no limit.
        include_orphans: also sweep logs, artifacts, artifact collections and cache rows
            whose run no longer exists (needs database access).
        events_older_than_days: delete events older than this (needs database access);
            empty: leave events to the server.
        heartbeat_events_older_than_days: the shorter age for flow-run heartbeat events;
            empty: the same as other events.
        vacuum: VACUUM (ANALYZE) the tables rows were deleted from (SQL engine).
        archive_to: before deleting, write each batch's runs (states, task runs, inputs,
            logs, artifacts) as gzip JSON Lines to this storage block
            ("local-file-system/<name>", "remote-file-system/<name>", "s3-bucket/<name>")
            or fsspec URL or absolute path ("s3://bucket/prefix"); empty: no archive.
    """
    parameters = RetentionParameters.parse(
        older_than_days=older_than_days,
        states=states,
        per_state_days=per_state_days,
        keep_last_per_deployment=keep_last_per_deployment,
        deployment_names=deployment_names,
        flow_names=flow_names,
        tags=tags,
        exclude_tags=exclude_tags,
        dry_run=dry_run,
        engine=engine,
        batch_size=batch_size,
        max_runs_per_second=max_runs_per_second,
        max_minutes=max_minutes,
        include_orphans=include_orphans,
        events_older_than_days=events_older_than_days,
        heartbeat_events_older_than_days=heartbeat_events_older_than_days,
        vacuum=vacuum,
        archive_to=archive_to,
    )
    logger = get_run_logger()
    settings = get_settings()
    rate = (
        settings.default_max_runs_per_second
        if parameters.max_runs_per_second is None
        else parameters.max_runs_per_second
    )
    throttle = Throttle(rate)
    deadline = Deadline(parameters.max_minutes)
    started = perf_counter()
    archive = await BatchArchive.open(
        parameters.archive_to, flow_run.name or "retention", flow_run.id or "", dry_run=parameters.dry_run
    )
    async with open_engine(parameters.engine, throttle) as chosen:
        chosen.archive = archive
        logger.info("Retention with the %s engine%s", chosen.name, " (dry run)" if parameters.dry_run else "")
        policy = await resolve_policy(chosen, parameters)
        async with nullcontext() if parameters.dry_run else chosen.exclusive():
            with heap_frozen():
                purge = await purge_expired_runs(chosen, policy, parameters, throttle, deadline)
            orphans = await sweep_orphans(chosen, parameters, deadline)
            rules = event_rules(parameters, datetime.now(UTC))
            partitions = await drop_old_partitions(chosen, parameters, rules)
            events = await delete_old_events(chosen, parameters, deadline, rules, partitions)
            vacuumed = await vacuum_tables(chosen, parameters, [purge.totals.rows, orphans, events])
            logs_queued = await wait_for_log_deletion(chosen, parameters)
        flow_names_by_id, deployment_names_by_id = await chosen.names_of(
            purge.totals.flow_ids, purge.totals.deployment_ids
        )
    notes = (
        limitations(chosen, parameters, logs_queued)
        + partitions.notes()
        + (archive.notes() if archive else [])
        + ([f"Stopped by an error: {purge.error}"] if purge.error else [])
    )
    report = RetentionReport.build(
        purge.totals,
        flow_names=flow_names_by_id,
        deployment_names=deployment_names_by_id,
        engine=chosen.name,
        measures_space=chosen.measures_space,
        dry_run=parameters.dry_run,
        database=describe_database_url(settings.database_url) if chosen.name == "sql" else "Prefect API",
        days_per_state={state: parameters.days_for(state) for state in parameters.states},
        orphan_rows_deleted=orphans,
        event_rows_deleted=events,
        partitions_dropped=partitions.dropped,
        remaining=purge.remaining,
        stopped_reason=purge.stopped_reason,
        seconds=perf_counter() - started,
        max_runs_per_second=rate,
        slowdowns=throttle.slowdowns,
        vacuumed_tables=vacuumed,
        notes=notes,
    )
    await publish_report(report.artifacts())
    logger.info("Retention %s (%s)", report.summary(), report.stopped_reason)
    if purge.error:
        raise RetentionFailed(f"retention stopped after {report.flow_runs_deleted} flow runs: {purge.error}")
    return report
