"""The stuck-run rules: what each finds, its threshold, the state it sets.

Each rule is one `Rule` record: a cheap, indexed pre-selection of runs (`Selection`, run
as SQL when the database is reachable and as an API filter otherwise) and a `judge` that
looks at one run's snapshot and says what state it should get and what was seen. Both
detection paths feed the same judges, so a rule means the same thing either way. The
flow walks `RULES` in order; a new rule is a new record and its judge.

Order matters: the poison pill is repaired first because it breaks API listing for
everything else; rules that end runs come next; orphaned subflows and open task runs
come last, because the runs holding them may have been ended earlier in the same pass;
concurrency slots are counted after everything else, once every run this pass ends has
given its slot back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID

from tasks.prefect_api import TERMINAL_STATES, RunKind
from tasks.reconcile.parameters import ReconcileParameters

NON_TERMINAL_STATES = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")
STATE_NAMES = {
    "SCHEDULED": "Scheduled",
    "PENDING": "Pending",
    "RUNNING": "Running",
    "PAUSED": "Paused",
    "CANCELLING": "Cancelling",
    "COMPLETED": "Completed",
    "FAILED": "Failed",
    "CANCELLED": "Cancelled",
    "CRASHED": "Crashed",
}
# Not a Prefect state: the Unknown rule's `delete` action removes the run through the API.
DELETE = "DELETE"
UNKNOWN_STATE_TARGETS = {"crash": "CRASHED", "fail": "FAILED", "cancel": "CANCELLED", "delete": DELETE}


@dataclass(frozen=True)
class Snapshot:
    """One run as detection saw it. The holder is a subflow's parent flow run, or the flow
    run a task run belongs to; `holder_exists` is False when a subflow's parent is gone.
    A task run that stands for a subflow names it in `subflow_id`."""

    run_id: UUID
    run_name: str
    flow_name: str | None
    state_id: UUID | None
    state_type: str | None
    state_name: str | None
    state_timestamp: datetime | None
    start_time: datetime | None = None
    next_scheduled_start_time: datetime | None = None
    latest_heartbeat: datetime | None = None
    is_subflow: bool = False
    holder_id: UUID | None = None
    holder_state_type: str | None = None
    holder_state_timestamp: datetime | None = None
    holder_exists: bool = True
    subflow_id: UUID | None = None
    subflow_state_type: str | None = None


@dataclass(frozen=True)
class Verdict:
    """What a rule decided for one run: the state it gets (or deletion) and why."""

    target_type: str
    target_name: str
    seen: str


@dataclass(frozen=True)
class Judging:
    """What a judge needs besides the run: the parameters, the clock, and the flow runs this
    pass ends (id -> the state type they end in), whose subflows and task runs follow them."""

    parameters: ReconcileParameters
    now: datetime
    cutoff: datetime | None
    ending: Mapping[UUID, str]


Judge = Callable[[Snapshot, Judging], Verdict | None]


@dataclass(frozen=True)
class Selection:
    """The runs a rule looks at, before its judge decides: by state type, plus a condition.

    `sql_condition` is SQL over `run` (the candidate) and `holder`, with `:cutoff` and
    `:ending_ids` bound; `api_filter` is the same idea as a Prefect flow run filter, with
    `api_before` naming a time field that must lie before the cutoff. Both may select more
    than the rule wants (the judge decides), never less.
    """

    run_kind: RunKind = "flow_run"
    state_types: tuple[str, ...] | None = None
    sql_condition: str = "TRUE"
    api_filter: Mapping[str, object] = field(default_factory=dict)
    api_before: str | None = None
    heartbeats: bool = False


@dataclass(frozen=True)
class Rule:
    name: str
    title: str
    finds: str
    sets: str
    threshold: str | None
    selection: Selection = field(default_factory=Selection)
    # None for the one rule that is not about runs one by one (concurrency slots): the flow
    # hands it to its own task instead of detection and `end_stuck_runs`.
    judge: Judge | None = None
    # Only where orchestration refuses a correct repair (re-recording a Running state).
    force: bool = False
    # False for a repair that leaves the run where it was (it can still be judged later).
    ends_run: bool = True
    # Through the API the runs this rule exists for cannot be read at all: the ones that
    # fail to load are counted as found; their ids are learnt when `bulk_set_state` repairs
    # them, or before, from their events, where it is missing.
    unreadable_are_found: bool = False
    # A run this rule ends can make its own subflows match the rule: the rule is applied
    # again, one level further down the tree, until nothing new is found.
    follows_the_tree_down: bool = False

    def is_enabled(self, parameters: ReconcileParameters) -> bool:
        return self.threshold is None or getattr(parameters, self.threshold) is not None

    def describe_threshold(self, parameters: ReconcileParameters) -> str:
        if self.threshold is None:
            return "always"
        value = getattr(parameters, self.threshold)
        return "off" if value is None else f"{self.threshold}={value:g}"


def moment(timestamp: datetime, now: datetime) -> str:
    """A UTC time of day, with the date when it is not today."""
    if timestamp.date() == now.date():
        return f"{timestamp:%H:%M} UTC"
    return f"{timestamp:%Y-%m-%d %H:%M} UTC"


def duration(span: timedelta) -> str:
    """A short human duration: '40 s', '12 min', '2 h 10 min', '3 d 4 h'."""
    seconds = max(0, int(span.total_seconds()))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min"
    return f"{seconds} s"


def since(timestamp: datetime, now: datetime) -> str:
    return f"{moment(timestamp, now)} ({duration(now - timestamp)})"


def _older(timestamp: datetime | None, judging: Judging) -> bool:
    return timestamp is not None and judging.cutoff is not None and timestamp < judging.cutoff


def judge_poison_pill(run: Snapshot, judging: Judging) -> Verdict | None:
    if run.state_type != "RUNNING" or run.state_timestamp is not None:
        return None
    return Verdict(
        "RUNNING",
        run.state_name or "Running",
        "Running with no state timestamp (listings holding it answer 500); Running recorded again",
    )


def judge_unknown_state(run: Snapshot, judging: Judging) -> Verdict | None:
    if run.state_id is not None:
        return None
    target = UNKNOWN_STATE_TARGETS[judging.parameters.unknown_state_action]
    last = f"{run.state_name} ({run.state_type})" if run.state_name else "nothing"
    seen = f"no current state (its state row is missing; last recorded as {last})"
    return Verdict(target, "Deleted" if target == DELETE else STATE_NAMES[target], seen)


def stuck_in_state(target_type: str) -> Judge:
    def judge(run: Snapshot, judging: Judging) -> Verdict | None:
        if not _older(run.state_timestamp, judging):
            return None
        seen = f"in {run.state_name} since {since(run.state_timestamp, judging.now)}"
        return Verdict(target_type, STATE_NAMES[target_type], seen)

    return judge


def judge_zombie(run: Snapshot, judging: Judging) -> Verdict | None:
    # A run that never sent a heartbeat (an older engine, heartbeats switched off) is not
    # judged here; a run whose Running state began after its last heartbeat (a retry) is
    # given the threshold from that state on.
    if not (_older(run.latest_heartbeat, judging) and _older(run.state_timestamp, judging)):
        return None
    return Verdict("CRASHED", "Crashed", f"no heartbeat since {since(run.latest_heartbeat, judging.now)}")


def judge_max_runtime(run: Snapshot, judging: Judging) -> Verdict | None:
    if not _older(run.start_time, judging):
        return None
    limit = judging.parameters.max_runtime_hours
    seen = f"running since {since(run.start_time, judging.now)}, longer than the {limit:g} h limit"
    return Verdict("CRASHED", "Crashed", seen)


def judge_late(run: Snapshot, judging: Judging) -> Verdict | None:
    if not _older(run.next_scheduled_start_time, judging):
        return None
    start = run.next_scheduled_start_time
    seen = f"expired: scheduled for {moment(start, judging.now)}, {duration(judging.now - start)} ago"
    return Verdict("CANCELLED", "Expired", seen)


def judge_orphaned_subflow(run: Snapshot, judging: Judging) -> Verdict | None:
    if not run.is_subflow:
        return None
    ending = judging.ending.get(run.holder_id) if run.holder_id else None
    parent_state = ending or run.holder_state_type
    if run.holder_exists and parent_state not in TERMINAL_STATES:
        return None
    parent_cancelled = run.holder_exists and parent_state == "CANCELLED"
    # Scheduled and Paused children of a parent that finished normally may be legitimate
    # (a deployment run started without waiting); those of a cancelled parent are not.
    if not parent_cancelled and run.state_type not in ("RUNNING", "PENDING", "CANCELLING"):
        return None
    signs_of_life = [sign for sign in (run.latest_heartbeat, run.state_timestamp) if sign]
    last_sign = max(signs_of_life) if signs_of_life else None
    if not _older(last_sign, judging):
        return None
    if run.holder_exists:
        parent = f"its parent flow run {run.holder_id} is {STATE_NAMES[parent_state]}"
    else:
        parent = "its parent flow run no longer exists"
    seen = f"{parent}; no sign of life since {since(last_sign, judging.now)}"
    # From Cancelling only Cancelled is accepted, and it is where such a run was going.
    target = "CANCELLED" if parent_cancelled or run.state_type == "CANCELLING" else "CRASHED"
    return Verdict(target, STATE_NAMES[target], seen)


def judge_open_task_run(run: Snapshot, judging: Judging) -> Verdict | None:
    ending = judging.ending.get(run.holder_id) if run.holder_id else None
    if ending == DELETE:
        return None  # its task runs are deleted with it
    # Prefect gives a subflow's task run every state of the subflow: it follows its subflow.
    if run.subflow_id and (run.subflow_state_type not in TERMINAL_STATES or run.subflow_id in judging.ending):
        return None
    # Task run states reach the database through events, a little after the flow run's own
    # final state: give them the silence threshold before calling them left open.
    ended_long_ago = run.holder_state_type in TERMINAL_STATES and _older(run.holder_state_timestamp, judging)
    if ending is None and not ended_long_ago:
        return None
    flow_state = ending or run.holder_state_type
    # The task run ends the way its flow run ended; from Cancelling only Cancelled is accepted.
    target = "CANCELLED" if run.state_type == "CANCELLING" else flow_state
    seen = f"left {run.state_name} inside flow run {run.holder_id}, which is {STATE_NAMES[flow_state]}"
    return Verdict(target, STATE_NAMES[target], seen)


_TERMINAL_SQL = ", ".join(f"'{state}'" for state in TERMINAL_STATES)
_ENDED_HOLDER_SQL = (
    f"(holder.state_type IN ({_TERMINAL_SQL}) OR holder.id = ANY(CAST(:ending_ids AS uuid[])))"
)

RULES: tuple[Rule, ...] = (
    Rule(
        name="poison-pill",
        title="Poison pill",
        finds="Running runs with no state timestamp (they make /flow_runs/filter answer 500)",
        sets="Running again, with a timestamp (forced)",
        threshold=None,
        selection=Selection(state_types=("RUNNING",), sql_condition="run.state_timestamp IS NULL"),
        judge=judge_poison_pill,
        force=True,
        ends_run=False,
        unreadable_are_found=True,
    ),
    Rule(
        name="unknown-state",
        title="Unknown state",
        finds="runs with no current state (shown as Unknown)",
        sets="Crashed, Failed, Cancelled or deleted (unknown_state_action)",
        threshold=None,
        selection=Selection(sql_condition="run.state_id IS NULL"),
        judge=judge_unknown_state,
    ),
    Rule(
        name="stuck-cancelling",
        title="Stuck Cancelling",
        finds="runs in Cancelling longer than the threshold",
        sets="Cancelled",
        threshold="cancelling_after_minutes",
        selection=Selection(state_types=("CANCELLING",), sql_condition="run.state_timestamp < :cutoff"),
        judge=stuck_in_state("CANCELLED"),
    ),
    Rule(
        name="stuck-pending",
        title="Stuck Pending",
        finds="runs in a Pending state longer than the threshold",
        sets="Crashed",
        threshold="pending_after_minutes",
        selection=Selection(state_types=("PENDING",), sql_condition="run.state_timestamp < :cutoff"),
        judge=stuck_in_state("CRASHED"),
    ),
    Rule(
        name="zombie",
        title="Zombie Running",
        finds="Running runs whose last heartbeat is older than the threshold",
        sets="Crashed",
        threshold="zombie_after_minutes",
        selection=Selection(
            state_types=("RUNNING",), sql_condition="run.state_timestamp < :cutoff", heartbeats=True
        ),
        judge=judge_zombie,
    ),
    Rule(
        name="max-runtime",
        title="Max runtime",
        finds="Running runs that started longer ago than max_runtime_hours",
        sets="Crashed",
        threshold="max_runtime_hours",
        selection=Selection(
            state_types=("RUNNING",), sql_condition="run.start_time < :cutoff", api_before="start_time"
        ),
        judge=judge_max_runtime,
    ),
    Rule(
        name="late",
        title="Late forever",
        finds="Scheduled or Late runs further past their start than late_after_hours",
        sets="Cancelled (Expired)",
        threshold="late_after_hours",
        selection=Selection(
            state_types=("SCHEDULED",),
            sql_condition="run.next_scheduled_start_time < :cutoff",
            api_before="next_scheduled_start_time",
        ),
        judge=judge_late,
    ),
    Rule(
        name="orphaned-subflow",
        title="Orphaned subflow",
        finds="unfinished subflows whose parent ended or is gone, silent longer than the threshold",
        sets="Cancelled when the parent was cancelled, otherwise Crashed",
        threshold="zombie_after_minutes",
        selection=Selection(
            state_types=NON_TERMINAL_STATES,
            sql_condition=f"run.parent_task_run_id IS NOT NULL AND (holder.id IS NULL OR {_ENDED_HOLDER_SQL})",
            api_filter={"parent_task_run_id": {"is_null_": False}},
            heartbeats=True,
        ),
        judge=judge_orphaned_subflow,
        follows_the_tree_down=True,
    ),
    Rule(
        name="open-task-run",
        title="Open task run",
        finds="unfinished task runs inside a flow run that ended longer ago than the threshold",
        sets="the flow run's terminal state",
        threshold="zombie_after_minutes",
        selection=Selection(
            run_kind="task_run", state_types=NON_TERMINAL_STATES, sql_condition=_ENDED_HOLDER_SQL
        ),
        judge=judge_open_task_run,
    ),
    Rule(
        name="concurrency-slots",
        title="Concurrency slots",
        finds="deployment concurrency limits whose active slots differ from the runs holding them "
        "(Pending, Running, Cancelling)",
        sets="active slots = holders, by decrement or increment",
        threshold=None,
        ends_run=False,
    ),
)

RULES_BY_NAME = {rule.name: rule for rule in RULES}
