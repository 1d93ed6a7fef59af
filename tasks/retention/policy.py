"""What may be deleted: the retention policy applied to run records, in plain Python.

Both engines read runs (from the database or the API) into `RunRecord`s and ask this
module the same two questions, so a dry run, a SQL purge and an API purge agree:

- `RetentionPolicy.selects(run)`: is this top-level run past its retention age and inside
  the include filters, with nothing protecting it?
- `judge_trees(...)`: of these selected runs and their subflows, read again just before
  deletion, which trees may go? A tree goes whole or not at all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID

from tasks.retention.parameters import TERMINAL_STATES, RetentionParameters

# Why a selected run was left in place; the report counts runs per reason.
GONE_OR_BUSY = "gone or locked by another transaction"
CHANGED = "changed since it was selected"
UNFINISHED_MEMBER = "a run in its tree is not finished"
PROTECTED_MEMBER = "a run in its tree carries an excluded tag or is kept by keep_last_per_deployment"


@dataclass(frozen=True, slots=True)
class RunRecord:
    """The columns of a flow run that the policy and the report look at.

    `state_type` is None when the run's state row is missing (the UI's "Unknown"): such a
    run is not known to be finished. `finished` is the run's age reference: its end time,
    else its state's time, else when it was due, else when it was created; the fallbacks
    keep runs that never started (cancelled while scheduled, end time never written) from
    living forever.
    """

    id: UUID
    name: str
    flow_id: UUID
    deployment_id: UUID | None
    state_type: str | None
    finished: datetime | None
    tags: tuple[str, ...]
    parent_task_run_id: UUID | None

    @property
    def is_terminal(self) -> bool:
        return self.state_type in TERMINAL_STATES


def age_reference(*candidates: datetime | None) -> datetime | None:
    """The first known of: end time, state time, expected start time, created."""
    return next((moment for moment in candidates if moment is not None), None)


@dataclass(frozen=True)
class RetentionPolicy:
    """The parameters resolved against one database at one moment."""

    cutoffs: Mapping[str, datetime]
    deployment_ids: frozenset[UUID] | None = None
    flow_ids: frozenset[UUID] | None = None
    tags: frozenset[str] = frozenset()
    exclude_tags: frozenset[str] = frozenset()
    kept_newest: frozenset[UUID] = field(default_factory=frozenset)

    @classmethod
    def from_parameters(
        cls,
        parameters: RetentionParameters,
        now: datetime,
        *,
        deployment_ids: Iterable[UUID] | None = None,
        flow_ids: Iterable[UUID] | None = None,
        kept_newest: Iterable[UUID] = (),
    ) -> RetentionPolicy:
        return cls(
            cutoffs={state: now - timedelta(days=parameters.days_for(state)) for state in parameters.states},
            deployment_ids=None if deployment_ids is None else frozenset(deployment_ids),
            flow_ids=None if flow_ids is None else frozenset(flow_ids),
            tags=frozenset(parameters.tags),
            exclude_tags=frozenset(parameters.exclude_tags),
            kept_newest=frozenset(kept_newest),
        )

    @property
    def states(self) -> tuple[str, ...]:
        return tuple(self.cutoffs)

    @property
    def latest_cutoff(self) -> datetime:
        """Runs that finished after this are young for every selected state (a safe pre-filter)."""
        return max(self.cutoffs.values())

    def is_protected(self, run: RunRecord) -> bool:
        return run.id in self.kept_newest or not self.exclude_tags.isdisjoint(run.tags)

    def selects(self, run: RunRecord) -> bool:
        cutoff = self.cutoffs.get(run.state_type or "")
        return (
            cutoff is not None
            and run.finished is not None
            and run.finished < cutoff
            and run.parent_task_run_id is None
            and (self.deployment_ids is None or run.deployment_id in self.deployment_ids)
            and (self.flow_ids is None or run.flow_id in self.flow_ids)
            and (not self.tags or not self.tags.isdisjoint(run.tags))
            and not self.is_protected(run)
        )

    def member_blocks_tree(self, run: RunRecord) -> str | None:
        """Why this subflow keeps its whole tree, or None when it may go with it."""
        if not run.is_terminal:
            return UNFINISHED_MEMBER
        if self.is_protected(run):
            return PROTECTED_MEMBER
        return None


@dataclass
class TreeVerdict:
    """The runs of a batch that may be deleted, and how many were left, per reason."""

    accepted: list[RunRecord] = field(default_factory=list)
    left: Counter[str] = field(default_factory=Counter)


def judge_trees(
    root_ids: Iterable[UUID],
    members_of: Mapping[UUID, list[UUID]],
    current: Mapping[UUID, RunRecord],
    policy: RetentionPolicy,
) -> TreeVerdict:
    """Decide tree by tree on freshly read runs.

    `members_of[root]` lists the root's subflows at any depth; `current` holds every run
    as it reads now (a run missing from it is gone, or locked by someone else). A tree is
    accepted only when its root is still selected and every member may go with it.
    """
    verdict = TreeVerdict()
    for root_id in root_ids:
        root = current.get(root_id)
        if root is None:
            verdict.left[GONE_OR_BUSY] += 1
            continue
        if not policy.selects(root):
            verdict.left[CHANGED] += 1
            continue
        members = [current.get(member_id) for member_id in members_of.get(root_id, [])]
        if any(member is None for member in members):
            verdict.left[GONE_OR_BUSY] += 1
            continue
        reasons = [policy.member_blocks_tree(member) for member in members]
        blocking = next((reason for reason in reasons if reason), None)
        if blocking:
            verdict.left[blocking] += 1
            continue
        verdict.accepted.append(root)
        verdict.accepted.extend(members)
    return verdict
