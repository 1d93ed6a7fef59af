"""One reconcile pass: the rules of `RULES` in order, over one scope and one budget.

The flow runs a pass with each rule's steps as Prefect tasks (the UI shows `find-<rule>`
and `end-<rule>` per rule); the health report counts with a pass that only finds, in plain
calls (no task runs). Either way a rule means the same thing:

- a run rule finds its runs, ends at most what is left of `max_actions`, and, when it
  follows the tree down, is applied again to the subflows of the runs it just ended; the
  flow runs it ends are handed to the later rules (their subflows and task runs follow);
- the concurrency-slots rule corrects the deployment limits twice: once before the first
  rule that ends runs, so that a dead run whose slot the server already took back holds
  one again and ending it cannot free a slot a live run holds (the deployment would admit
  one run too many), and once last, for what ending runs changed;
- an error in one rule is written into that rule's report and the next rules go on.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from tasks.reconcile.actions import end_stuck_runs
from tasks.reconcile.concurrency import reconcile_concurrency_slots
from tasks.reconcile.detect import (
    DetectionSource,
    RunScope,
    choose_detection_source,
    find_stuck_runs,
    resolve_scope,
)
from tasks.reconcile.parameters import ReconcileParameters
from tasks.reconcile.report import RuleReport
from tasks.reconcile.rules import RULES, Rule


@dataclass
class ReconcilePass:
    parameters: ReconcileParameters
    scope: RunScope
    source: DetectionSource
    # False: count what each rule finds, change nothing (the health report).
    acts: bool = True
    # True: each step is a Prefect task run; False: plain calls.
    as_tasks: bool = True
    budget: int = field(init=False)
    # Flow runs this pass ends (or would end): id -> the state type they end in.
    ending: dict[UUID, str] = field(default_factory=dict)
    # The concurrency limits corrected before the first rule that ends runs.
    early_slots: RuleReport | None = None

    def __post_init__(self) -> None:
        self.budget = self.parameters.max_actions

    async def _step(self, task: Any, *arguments: Any) -> Any:
        step: Callable[..., Awaitable[Any]] = task if self.as_tasks else task.fn
        return await step(*arguments)

    async def apply(self, rule: Rule) -> RuleReport:
        """Apply one rule; its report, with the error when it failed."""
        outcome = RuleReport.of(rule, self.parameters)
        if not rule.is_enabled(self.parameters):
            return outcome
        started = time.monotonic()
        try:
            if rule.judge is None:
                outcome = await self._correct_slots(rule)
            else:
                outcome = await self._end_runs(rule, outcome)
                self.budget -= outcome.fixed + outcome.skipped
        except Exception as error:  # one rule's failure must not stop the others
            outcome = self.early_slots if rule.judge is None and self.early_slots else outcome
            outcome.fail(error)
        outcome.seconds = round(outcome.seconds + time.monotonic() - started, 3)
        return outcome

    async def before(self, rule: Rule) -> None:
        """What must happen before `rule`: the early slot correction before the first rule that ends runs."""
        if self.early_slots is not None or not self.acts or not rule.ends_run or rule.judge is None:
            return
        slots_rule = next((each for each in RULES if each.judge is None), None)
        if slots_rule is None or not slots_rule.is_enabled(self.parameters):
            return
        self.early_slots = await self.apply(slots_rule)

    async def _correct_slots(self, rule: Rule) -> RuleReport:
        if not self.acts:
            return RuleReport.of(rule, self.parameters)
        early = self.early_slots
        # A dry run changed nothing before: what it would have corrected then is not counted twice.
        leave = (
            {correction.limit_id for correction in early.limits}
            if early and self.parameters.dry_run
            else set()
        )
        outcome = await self._step(
            reconcile_concurrency_slots, rule, self.parameters, self.scope, self.source, self.budget, leave
        )
        self.budget -= outcome.fixed + outcome.skipped
        if early is None:
            return outcome
        early.absorb(outcome)
        return early

    async def _end_runs(self, rule: Rule, outcome: RuleReport) -> RuleReport:
        findings = await self._step(
            find_stuck_runs, rule, self.parameters, self.scope, self.source, self.ending
        )
        if not self.acts:
            outcome.found = findings.found_by(rule)
            if rule.ends_run:
                self.ending.update(findings.ending())
            return outcome
        if findings.candidates or findings.unreadable:
            outcome = await self._step(
                end_stuck_runs, rule, findings, self.parameters, self.scope, self.budget
            )
        if rule.ends_run:
            self.ending.update(outcome.ended_flow_runs())
        while rule.follows_the_tree_down and outcome.ended_flow_runs():
            deeper = await self._step(
                find_stuck_runs, rule, self.parameters, self.scope, self.source, self.ending
            )
            seen = set(outcome.ids())
            deeper.candidates = [found for found in deeper.candidates if found.run.run_id not in seen]
            if not deeper.candidates:
                break
            budget = self.budget - outcome.fixed - outcome.skipped
            outcome.absorb(
                await self._step(end_stuck_runs, rule, deeper, self.parameters, self.scope, budget)
            )
            self.ending.update(outcome.ended_flow_runs())
        return outcome


async def count_stuck_runs(parameters: ReconcileParameters | None = None) -> dict[str, int]:
    """Rule name -> runs a reconcile pass would find now (default thresholds; rules that are
    off by default, and the concurrency limits, are left out). Read-only; by SQL when the
    database is reachable; no task runs."""
    parameters = parameters or ReconcileParameters()
    source = await choose_detection_source.fn()
    scope = await resolve_scope.fn(parameters)
    counting = ReconcilePass(parameters, scope, source, acts=False, as_tasks=False)
    reports = await walk_rules(counting)
    return {
        report.rule: report.found
        for rule, report in zip(RULES, reports, strict=True)
        if rule.judge is not None and rule.is_enabled(parameters)
    }


async def walk_rules(
    reconcile: ReconcilePass, on_rule: Callable[[Rule, RuleReport, int], Awaitable[None]] | None = None
) -> list[RuleReport]:
    """Every rule of `RULES` in order; `on_rule(rule, report, done)` after each."""
    reports = []
    for done, rule in enumerate(RULES, start=1):
        await reconcile.before(rule)
        report = await reconcile.apply(rule)
        reports.append(report)
        if on_rule is not None:
            await on_rule(rule, report, done)
    return reports
