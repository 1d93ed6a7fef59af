"""What a reconcile pass found and did, per rule and per run: the flow's return value and
the `reconcile-report` artifact."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from prefect.states import Failed, State
from pydantic import BaseModel, Field

from tasks.database import describe_error
from tasks.reconcile.parameters import ReconcileParameters
from tasks.reconcile.rules import Rule
from tasks.reports import ReportArtifacts, markdown_table, plural, run_link

REPORT_KEY = "reconcile-report"
RUNS_TABLE_KEY = "reconcile-report-runs"
# Runs listed per rule in the markdown; the table artifact and the returned report list all.
MARKDOWN_RUNS_PER_RULE = 25

Outcome = Literal["fixed", "would fix", "skipped", "left"]


class RunAction(BaseModel):
    run_id: UUID
    run_kind: Literal["flow_run", "task_run"]
    run_name: str
    flow_name: str | None = None
    from_state: str
    to_state: str
    # The state type it ends in (or DELETE), for the rules that follow in the same pass.
    to_type: str
    seen: str
    outcome: Outcome
    reason: str | None = None


class SlotHolder(BaseModel):
    """A run holding a slot of its deployment's concurrency limit."""

    run_id: UUID
    run_name: str
    state_name: str | None = None
    since: datetime | None = None


class SlotCorrection(BaseModel):
    """What the concurrency-slots rule saw and did for one deployment limit."""

    limit_id: UUID
    limit_name: str
    limit: int
    deployment_id: UUID
    deployment_name: str
    slots_before: int
    slots_after: int
    holders: list[SlotHolder] = Field(default_factory=list)
    # The requests made (or, in a dry run, that would be): "decrement 1", "increment 1".
    change: str = ""
    outcome: Outcome
    reason: str | None = None


class RuleReport(BaseModel):
    rule: str
    title: str
    finds: str
    sets: str
    threshold: str
    found: int = 0
    fixed: int = 0
    skipped: int = 0
    left: int = 0
    # Rows the API could not return (flow runs hit by the NULL state_timestamp bug).
    unreadable: int = 0
    runs: list[RunAction] = Field(default_factory=list)
    # The concurrency-slots rule acts on deployment limits, not on runs.
    limits: list[SlotCorrection] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    # Set when the rule stopped on an error; what it did before that is still counted.
    error: str | None = None
    seconds: float = 0.0

    @classmethod
    def of(cls, rule: Rule, parameters: ReconcileParameters) -> RuleReport:
        return cls(
            rule=rule.name,
            title=rule.title,
            finds=rule.finds,
            sets=rule.sets,
            threshold=rule.describe_threshold(parameters),
        )

    def record(self, action: RunAction) -> None:
        self.runs.append(action)
        self._count(action.outcome)

    def _count(self, outcome: Outcome) -> None:
        if outcome in ("fixed", "would fix"):
            self.fixed += 1
        elif outcome == "skipped":
            self.skipped += 1
        else:
            self.left += 1

    def fail(self, error: BaseException) -> None:
        self.error = describe_error(error)

    def summary(self, dry_run: bool) -> str:
        return (
            f"found {self.found}, {'would fix' if dry_run else 'fixed'} {self.fixed}, "
            f"skipped {self.skipped}, left {self.left}, in {self.seconds:.2f} s"
        )

    def record_slots(self, correction: SlotCorrection) -> None:
        self.limits.append(correction)
        self._count(correction.outcome)

    def absorb(self, deeper: RuleReport) -> None:
        """Add what the same rule found and did later in the pass (one level further down the
        tree; the concurrency limits once the rules that end runs are done)."""
        self.found += deeper.found
        self.unreadable += deeper.unreadable
        for action in deeper.runs:
            self.record(action)
        for correction in deeper.limits:
            self.record_slots(correction)
        self.notes += deeper.notes

    def ended_flow_runs(self) -> dict[UUID, str]:
        """Flow runs this rule ended (or would end), with the state type they end in."""
        return {
            action.run_id: action.to_type
            for action in self.runs
            if action.run_kind == "flow_run" and action.outcome in ("fixed", "would fix")
        }

    def ids(self, *outcomes: Outcome) -> list[UUID]:
        return [action.run_id for action in self.runs if not outcomes or action.outcome in outcomes]


class ReconcileReport(BaseModel):
    dry_run: bool
    detection: Literal["sql", "api"]
    detection_note: str
    started: datetime
    seconds: float = 0.0
    max_actions: int
    rules: list[RuleReport] = Field(default_factory=list)

    @property
    def found(self) -> int:
        return sum(rule.found for rule in self.rules)

    @property
    def fixed(self) -> int:
        return sum(rule.fixed for rule in self.rules)

    @property
    def skipped(self) -> int:
        return sum(rule.skipped for rule in self.rules)

    @property
    def left(self) -> int:
        return sum(rule.left for rule in self.rules)

    def rule(self, name: str) -> RuleReport:
        return next(rule for rule in self.rules if rule.rule == name)

    def failed_rules(self) -> list[str]:
        return [rule.rule for rule in self.rules if rule.error]

    def summary(self) -> str:
        verb = "would fix" if self.dry_run else "fixed"
        failed = self.failed_rules()
        return (
            f"found {plural(self.found, 'stuck run')}, {verb} {self.fixed}, skipped {self.skipped}, "
            f"left {self.left} for the next pass, in {self.seconds:.1f} s"
            + (f"; rules that failed: {', '.join(failed)}" if failed else "")
        )

    def artifacts(self) -> ReportArtifacts:
        return ReportArtifacts(
            key=REPORT_KEY,
            markdown=self.to_markdown(),
            description=self.summary(),
            table_key=RUNS_TABLE_KEY,
            table=self.table_rows(),
            table_description=f"Runs of this pass: {self.summary()}",
        )

    def table_rows(self) -> list[dict[str, str]]:
        return [
            {
                "rule": rule.rule,
                "run_id": str(action.run_id),
                "run": action.run_name,
                "flow": action.flow_name or "",
                "from": action.from_state,
                "to": action.to_state,
                "outcome": action.outcome,
                "seen": action.seen,
                "reason": action.reason or "",
            }
            for rule in self.rules
            for action in rule.runs
        ]

    def to_markdown(self) -> str:
        fixed_header = "would fix" if self.dry_run else "fixed"
        lines = [
            f"# Reconcile stuck runs{' (dry run: nothing was changed)' if self.dry_run else ''}",
            "",
            f"{self.summary().capitalize()}.",
            f"Detection: {self.detection_note}. At most {plural(self.max_actions, 'action')} per pass.",
            "",
            # Numbers first: at any width the counts are on screen; what each rule finds and
            # sets is the legend below.
            markdown_table(
                ["rule", "found", fixed_header, "skipped", "left", "seconds", "threshold"],
                (
                    (rule.title, rule.found, rule.fixed, rule.skipped, rule.left, f"{rule.seconds:.2f}")
                    + (rule.threshold,)
                    for rule in self.rules
                ),
            ),
            "",
            "What each rule finds, and the state it sets:",
            "",
            *(f"- **{rule.title}**: {rule.finds}. Sets: {rule.sets}." for rule in self.rules),
        ]
        for rule in self.rules:
            if rule.error:
                lines += ["", f"**{rule.title} failed**: {rule.error}"]
            if rule.unreadable:
                lines += [
                    "",
                    f"{rule.title}: {plural(rule.unreadable, 'run')} could not be read through the API.",
                ]
            lines += [f"\n{rule.title}: {note}." for note in rule.notes]
            if rule.limits:
                lines += [
                    "",
                    f"## {rule.title}",
                    "",
                    _limits_table(rule.limits),
                    "",
                    _limits_legend(rule.limits),
                ]
            if not rule.runs:
                continue
            shown = rule.runs[:MARKDOWN_RUNS_PER_RULE]
            # Table cells never wrap in the UI: the table holds the short columns, and what was
            # seen (and why a run was skipped) follows as a list, which wraps.
            lines += [
                "",
                f"## {rule.title}",
                "",
                markdown_table(
                    ["outcome", "from", "to", "run", "flow"],
                    (
                        (
                            action.outcome,
                            action.from_state,
                            action.to_state,
                            run_link(action.run_name, action.run_id, action.run_kind.replace("_", "-")),
                            action.flow_name or "",
                        )
                        for action in shown
                    ),
                ),
                "",
                "Seen:",
                "",
                *(
                    f"- **{action.run_name}**: {action.seen}"
                    + (f"; {action.outcome}: {action.reason}" if action.reason else "")
                    for action in shown
                ),
            ]
            if len(rule.runs) > len(shown):
                lines.append(f"\n... and {len(rule.runs) - len(shown)} more (see `{RUNS_TABLE_KEY}`).")
        return "\n".join(lines) + "\n"


def _limits_table(corrections: list[SlotCorrection]) -> str:
    return markdown_table(
        ["limit", "deployment", "allows", "slots before", "slots after", "change", "outcome"],
        (
            (
                f"`{correction.limit_name}`",
                correction.deployment_name,
                correction.limit,
                correction.slots_before,
                correction.slots_after,
                correction.change,
                correction.outcome,
            )
            for correction in corrections
        ),
    )


def _limits_legend(corrections: list[SlotCorrection]) -> str:
    """Who holds each limit's slots (and why one was skipped): a list, which wraps."""
    return "Held by:\n\n" + "\n".join(
        f"- `{correction.limit_name}`: "
        + (", ".join(f"{holder.run_name} ({holder.state_name})" for holder in correction.holders) or "no run")
        + (f"; {correction.outcome}: {correction.reason}" if correction.reason else "")
        for correction in corrections
    )


def final_state(report: ReconcileReport) -> ReconcileReport | State:
    """The report, or a Failed state carrying it when a rule failed: a pass that only half
    worked must not look Completed."""
    failed = report.failed_rules()
    if not failed:
        return report
    reasons = "; ".join(f"{rule.rule}: {rule.error}" for rule in report.rules if rule.error)
    return Failed(
        message=f"Rules failed: {reasons}. The other rules ran; `{REPORT_KEY}` says what each did.",
        data=report,
    )
