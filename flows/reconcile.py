"""Flow `reconcile-stuck-runs`: find every kind of stuck run and end it correctly.

Every few minutes (deployment `reconcile-stuck-runs/every-10-minutes`), or by hand from
the UI with a dry run first. One pass (`tasks.reconcile.passes`) over the rules of
`tasks.reconcile.rules.RULES` in turn: find their runs (read-only, by SQL when the database
is reachable, through the API otherwise), then end them through the API, skipping runs that
changed meanwhile, at most `max_actions` per pass; the deployment concurrency limits are
set to their runs before and after. A rule that fails is reported with its error and the
next rules go on.
Publishes the `reconcile-report` artifact and returns the report; the run ends Failed,
naming the failed rules, when any rule failed.
"""

import time
from datetime import UTC, datetime

from prefect import flow, get_run_logger

from tasks.reconcile.detect import choose_detection_source, resolve_scope
from tasks.reconcile.parameters import ReconcileParameters, UnknownStateAction
from tasks.reconcile.passes import ReconcilePass, walk_rules
from tasks.reconcile.report import ReconcileReport, RuleReport, final_state
from tasks.reconcile.rules import RULES, Rule
from tasks.reports import Progress, publish_report, run_name

DEFAULTS = ReconcileParameters()


@flow(name="reconcile-stuck-runs", flow_run_name=run_name("reconcile-stuck-runs"))
async def reconcile_stuck_runs(
    dry_run: bool = DEFAULTS.dry_run,
    cancelling_after_minutes: float = DEFAULTS.cancelling_after_minutes,
    pending_after_minutes: float = DEFAULTS.pending_after_minutes,
    zombie_after_minutes: float = DEFAULTS.zombie_after_minutes,
    max_runtime_hours: float | None = DEFAULTS.max_runtime_hours,
    late_after_hours: float | None = DEFAULTS.late_after_hours,
    unknown_state_action: UnknownStateAction = DEFAULTS.unknown_state_action,
    max_actions: int = DEFAULTS.max_actions,
    deployment_names: list[str] = [],
    flow_names: list[str] = [],
    tags: list[str] = [],
    work_queue_names: list[str] = [],
) -> ReconcileReport:
    """End stuck runs: Unknown, stuck Cancelling or Pending, zombie Running, over max
    runtime, Late forever, orphaned subflows, open task runs, and repair poison pills.

    Args:
        dry_run: report what would be done and change nothing.
        cancelling_after_minutes: a run in Cancelling longer than this becomes Cancelled.
        pending_after_minutes: a run in a Pending state longer than this becomes Crashed.
        zombie_after_minutes: a Running run whose last heartbeat is older becomes Crashed;
            also how long an orphaned subflow or an open task run may stay silent.
        max_runtime_hours: a run Running longer than this becomes Crashed (empty: off).
        late_after_hours: a Scheduled or Late run this far past its start is cancelled as
            expired (empty: off).
        unknown_state_action: what a run without a current state gets: crash, fail,
            cancel, or delete (through the API).
        max_actions: at most this many runs are acted on in one pass; the rest wait.
        deployment_names: only runs of these deployments ("flow-name/deployment-name").
        flow_names: only runs of these flows.
        tags: only runs carrying one of these tags.
        work_queue_names: only runs of these work queues.
    """
    parameters = ReconcileParameters.parse(
        dry_run=dry_run,
        cancelling_after_minutes=cancelling_after_minutes,
        pending_after_minutes=pending_after_minutes,
        zombie_after_minutes=zombie_after_minutes,
        max_runtime_hours=max_runtime_hours,
        late_after_hours=late_after_hours,
        unknown_state_action=unknown_state_action,
        max_actions=max_actions,
        deployment_names=deployment_names,
        flow_names=flow_names,
        tags=tags,
        work_queue_names=work_queue_names,
    )
    logger = get_run_logger()
    clock = time.monotonic()
    scope = await resolve_scope(parameters)
    source = await choose_detection_source()
    logger.info("Detection: %s", source.note)
    report = ReconcileReport(
        dry_run=parameters.dry_run,
        detection=source.kind,
        detection_note=source.note,
        started=datetime.now(UTC),
        max_actions=parameters.max_actions,
    )
    progress = Progress("Reconciling stuck runs, rule by rule")

    async def reported(rule: Rule, outcome: RuleReport, done: int) -> None:
        if outcome.error:
            logger.error("%s failed: %s", rule.title, outcome.error)
        logger.info("%s: %s", rule.title, outcome.summary(parameters.dry_run))
        await progress.update(100 * done / len(RULES))

    passing = ReconcilePass(parameters, scope, source)
    report.rules = await walk_rules(passing, reported)
    report.seconds = round(time.monotonic() - clock, 3)
    await publish_report(report.artifacts())
    logger.info("Reconcile %s", report.summary())
    return final_state(report)
