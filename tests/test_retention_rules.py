"""Retention's rules on their own: parameters, the policy's verdicts, and the pacing.

No server is needed: these are the decisions both engines share, checked on hand-made
run records, and the throttle checked on a clock that only moves when told to.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tasks.parameters import ParameterError
from tasks.retention.api_engine import run_record as api_run_record
from tasks.retention.parameters import RetentionParameters
from tasks.retention.policy import (
    CHANGED,
    GONE_OR_BUSY,
    PROTECTED_MEMBER,
    UNFINISHED_MEMBER,
    RetentionPolicy,
    RunRecord,
    judge_trees,
)
from tasks.retention.rate_limit import Deadline, Throttle, TokenBucket

pytestmark = pytest.mark.no_stack

NOW = datetime(2026, 1, 31, 12, tzinfo=UTC)
DEPLOYMENT = uuid.uuid4()
FLOW = uuid.uuid4()


def run(
    days_old: float | None = 100,
    *,
    state: str | None = "COMPLETED",
    tags: tuple[str, ...] = (),
    deployment: uuid.UUID | None = DEPLOYMENT,
    parent: uuid.UUID | None = None,
) -> RunRecord:
    return RunRecord(
        id=uuid.uuid4(),
        name="a-run",
        flow_id=FLOW,
        deployment_id=deployment,
        state_type=state,
        finished=None if days_old is None else NOW - timedelta(days=days_old),
        tags=tags,
        parent_task_run_id=parent,
    )


def policy(**parameters) -> RetentionPolicy:
    kept_newest = parameters.pop("kept_newest", ())
    return RetentionPolicy.from_parameters(RetentionParameters(**parameters), NOW, kept_newest=kept_newest)


@pytest.mark.parametrize(
    ("values", "parameter"),
    [
        ({"older_than_days": 1 / 24}, "older_than_days"),
        ({"older_than_days": -3}, "older_than_days"),
        ({"states": ["RUNNING"]}, "states"),
        ({"states": []}, "states"),
        ({"per_state_days": {"SCHEDULED": 5}}, "per_state_days"),
        ({"per_state_days": {"FAILED": 0.01}}, "per_state_days"),
        ({"engine": "psql"}, "engine"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 10_001}, "batch_size"),
        ({"max_runs_per_second": -1}, "max_runs_per_second"),
        ({"keep_last_per_deployment": -1}, "keep_last_per_deployment"),
        ({"deployment_names": ["nightly"]}, "deployment_names"),
        ({"events_older_than_days": 0}, "events_older_than_days"),
    ],
)
def test_a_bad_value_is_refused_with_its_parameter_named(values, parameter):
    with pytest.raises(ParameterError, match=rf"invalid retention parameters: {parameter}\b"):
        RetentionParameters.parse(**values)


def test_none_means_the_default_except_where_it_means_no_limit():
    parameters = RetentionParameters.parse(
        states=None, batch_size=None, max_minutes=None, events_older_than_days=None
    )
    assert parameters.states == ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
    assert parameters.batch_size == RetentionParameters().batch_size
    assert parameters.max_minutes is None
    assert parameters.events_older_than_days is None


def api_row(**columns) -> dict:
    row = {
        "id": str(uuid.uuid4()),
        "name": "from-the-api",
        "flow_id": str(FLOW),
        "deployment_id": None,
        "state_type": "CANCELLED",
        "state": {"type": "CANCELLED", "timestamp": "2025-12-01T00:00:00+00:00"},
        "end_time": None,
        "expected_start_time": None,
        "created": "2025-10-01T00:00:00+00:00",
        "tags": [],
        "parent_task_run_id": None,
    }
    return {**row, **columns}


def test_age_is_the_end_time_else_the_state_time_else_when_due_else_created():
    assert api_run_record(api_row(end_time="2025-12-05T00:00:00+00:00")).finished == datetime(
        2025, 12, 5, tzinfo=UTC
    )
    assert api_run_record(api_row()).finished == datetime(2025, 12, 1, tzinfo=UTC)
    never_started = api_row(
        state=None, state_type="CANCELLED", expected_start_time="2025-11-01T00:00:00+00:00"
    )
    assert api_run_record(never_started).finished == datetime(2025, 11, 1, tzinfo=UTC)
    created_only = api_run_record(api_row(state=None))
    assert created_only.finished == datetime(2025, 10, 1, tzinfo=UTC)
    assert created_only.state_type is None, "without a state row the run is not known to be finished"
    cancelled_before_it_started = api_run_record(api_row(created="2025-10-01T00:00:00+00:00"))
    assert policy().selects(cancelled_before_it_started), "a run that never started is not immortal"


def test_policy_selects_old_finished_top_level_runs_only():
    rules = policy(older_than_days=30)
    assert rules.selects(run(31))
    assert not rules.selects(run(29))
    assert not rules.selects(run(100, state="RUNNING"))
    assert not rules.selects(run(100, state=None)), "a run whose state is unknown is not known to be finished"
    assert not rules.selects(run(100, parent=uuid.uuid4())), "subflows go with their top-level run"


def test_per_state_days_and_states():
    rules = policy(older_than_days=30, per_state_days={"FAILED": 90}, states=["COMPLETED", "FAILED"])
    assert rules.selects(run(31, state="COMPLETED"))
    assert not rules.selects(run(31, state="FAILED"))
    assert rules.selects(run(91, state="FAILED"))
    assert not rules.selects(run(400, state="CRASHED")), "CRASHED is not among the states"


def test_include_filters_and_excluded_tags():
    assert policy(tags=["team-a"]).selects(run(tags=("team-a", "x")))
    assert not policy(tags=["team-a"]).selects(run(tags=("team-b",)))
    assert not policy(exclude_tags=["keep"]).selects(run(tags=("keep",)))
    kept = run()
    assert not policy(kept_newest=[kept.id]).selects(kept)


def test_a_tree_goes_whole_or_not_at_all():
    rules = policy(exclude_tags=["keep"])
    good_root, finished_child = run(), run(parent=uuid.uuid4())
    busy_root, running_child = run(), run(state="RUNNING", parent=uuid.uuid4())
    kept_root, kept_child = run(), run(tags=("keep",), parent=uuid.uuid4())
    changed_root = run(5)
    gone_root = run()
    members_of = {
        good_root.id: [finished_child.id],
        busy_root.id: [running_child.id],
        kept_root.id: [kept_child.id],
    }
    current = {
        item.id: item
        for item in (good_root, finished_child, busy_root, running_child, kept_root, kept_child, changed_root)
    }
    verdict = judge_trees(
        [good_root.id, busy_root.id, kept_root.id, changed_root.id, gone_root.id], members_of, current, rules
    )
    assert [item.id for item in verdict.accepted] == [good_root.id, finished_child.id]
    assert verdict.left == {UNFINISHED_MEMBER: 1, PROTECTED_MEMBER: 1, CHANGED: 1, GONE_OR_BUSY: 1}


def test_a_locked_subflow_keeps_its_tree():
    root, child = run(), run(parent=uuid.uuid4())
    verdict = judge_trees([root.id], {root.id: [child.id]}, {root.id: root}, policy())
    assert verdict.accepted == []
    assert verdict.left == {GONE_OR_BUSY: 1}


class FakeTime:
    """A clock that moves only when something sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_token_bucket_paces_to_the_rate():
    time = FakeTime()
    bucket = TokenBucket(100, clock=time.clock, sleep=time.sleep)
    for _ in range(10):
        await bucket.acquire(50)
    # 500 runs at 100 runs/s, one second of burst allowed: four seconds of waiting.
    assert sum(time.slept) == pytest.approx(4.0)


async def test_unlimited_bucket_never_waits():
    time = FakeTime()
    bucket = TokenBucket(0, clock=time.clock, sleep=time.sleep)
    await bucket.acquire(1_000_000)
    assert time.slept == []


async def test_throttle_halves_the_rate_when_a_batch_is_much_slower_than_usual_and_recovers():
    time = FakeTime()
    throttle = Throttle(400, clock=time.clock, sleep=time.sleep)
    for _ in range(5):
        throttle.after_batch(0.1, 100)
    assert throttle.current_rate == 400
    throttle.after_batch(2.0, 100)
    assert throttle.current_rate == 200 and throttle.slowdowns == 1
    for _ in range(10):
        throttle.after_batch(0.1, 100)
    assert throttle.current_rate == 400


async def test_throttle_without_a_limit_slows_down_from_what_was_sustained():
    time = FakeTime()
    throttle = Throttle(0, clock=time.clock, sleep=time.sleep)
    for _ in range(5):
        throttle.after_batch(0.5, 1000)
    assert throttle.current_rate == 0
    throttle.after_batch(6.0, 1000)
    # Batches ran at 2,000 runs/s; half of that from now on.
    assert throttle.current_rate == pytest.approx(1000)


async def test_pushback_slows_down_and_backs_off_exponentially():
    time = FakeTime()
    throttle = Throttle(100, clock=time.clock, sleep=time.sleep)
    for attempt in range(3):
        await throttle.after_pushback(attempt)
    assert time.slept == [0.5, 1.0, 2.0]
    assert throttle.current_rate == pytest.approx(12.5)


def test_deadline():
    time = FakeTime()
    deadline = Deadline(2, clock=time.clock)
    assert not deadline.passed
    time.now = 119.0
    assert not deadline.passed
    time.now = 120.0
    assert deadline.passed
    assert not Deadline(None, clock=time.clock).passed
