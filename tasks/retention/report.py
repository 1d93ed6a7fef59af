"""What a retention run did (or, in a dry run, would do): totals, breakdowns, the report.

Engines return one `BatchOutcome` per batch; `RetentionTotals` adds them up; at the end
`RetentionReport` is built from the totals with names resolved, returned by the flow and
published as artifacts under the key `retention-report`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel

from tasks.reports import ReportArtifacts, human_bytes, markdown_table, plural, run_link
from tasks.retention.artifact_collections import REPOINTED, CollectionChanges, CollectionTally
from tasks.retention.policy import RunRecord
from tasks.retention.sql_partitions import DroppedPartition

REPORT_KEY = "retention-report"
# The per-state, per-deployment and per-flow counts, as a table: a key of its own, so that each
# key's history in the UI holds one kind of artifact.
BREAKDOWN_KEY = "retention-report-breakdown"
SAMPLE_SIZE = 20
BREAKDOWN_ROWS = 25
NO_DEPLOYMENT = "(no deployment)"

# What deleting rows does to the files, for every figure of the space they took.
SPACE_REUSE = (
    "PostgreSQL reuses the space of deleted rows for new ones; the files on disk shrink only after "
    "`VACUUM FULL` or `pg_repack`."
)

# What a dropped partition gives back, beside what a row delete does.
PARTITIONS_TEXT = (
    "Every row of these partitions was past the age: each went in one `DETACH` and `DROP`, "
    "its space back on disk at once, with no dead rows to vacuum. Their rows are not in the "
    "counts above (the planner's estimate is shown)."
)

StoppedReason = Literal["finished", "max_minutes", "failed"]


@dataclass
class BatchOutcome:
    """One batch: the flow runs deleted (or that would be), rows per table and the space
    they took (when the engine measures it), artifact collections changed, runs left and why."""

    runs: list[RunRecord] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] | None = None
    collections: CollectionChanges = field(default_factory=CollectionChanges)
    left: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


@dataclass
class RetentionTotals:
    """Running totals over all batches."""

    batches: int = 0
    flow_runs: int = 0
    table_rows: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    collections: CollectionTally = field(default_factory=CollectionTally)
    left: Counter[str] = field(default_factory=Counter)
    # (flow id, deployment id, state type) -> flow runs
    groups: Counter[tuple[UUID, UUID | None, str]] = field(default_factory=Counter)
    sample: list[RunRecord] = field(default_factory=list)

    def add(self, outcome: BatchOutcome) -> None:
        self.batches += 1
        self.flow_runs += len(outcome.runs)
        self.table_rows.update(outcome.rows)
        self.bytes.update(outcome.bytes or {})
        self.collections.add(outcome.collections)
        self.left.update(outcome.left)
        self.groups.update((run.flow_id, run.deployment_id, run.state_type or "") for run in outcome.runs)
        self.sample.extend(outcome.runs[: SAMPLE_SIZE - len(self.sample)])

    @property
    def rows(self) -> Counter[str]:
        """Rows per table, each artifact collection counted once by what became of it."""
        return self.table_rows + Counter(self.collections.counts())

    @property
    def flow_ids(self) -> set[UUID]:
        return {flow_id for flow_id, _, _ in self.groups} | {run.flow_id for run in self.sample}

    @property
    def deployment_ids(self) -> set[UUID]:
        ids = {deployment_id for _, deployment_id, _ in self.groups}
        ids |= {run.deployment_id for run in self.sample}
        return {deployment_id for deployment_id in ids if deployment_id is not None}


class RunSample(BaseModel):
    id: UUID
    name: str
    state: str | None
    flow: str
    deployment: str
    finished: datetime | None
    # A subflow goes with its top-level run's tree, whatever its own age.
    subflow: bool = False


class RetentionReport(BaseModel):
    """The retention flow's result. In a dry run every count is what a real run would delete."""

    engine: Literal["sql", "api"]
    dry_run: bool
    database: str
    days_per_state: dict[str, float]
    flow_runs_deleted: int
    rows_deleted: dict[str, int]
    # The space the rows deleted with the runs took, per table (see `space_text`); None:
    # not measured (it takes direct access to a PostgreSQL database).
    bytes_deleted: dict[str, int] | None
    orphan_rows_deleted: dict[str, int]
    event_rows_deleted: dict[str, int]
    # Partitioned event tables: the partitions dropped whole (their rows are not in the counts).
    partitions_dropped: list[DroppedPartition] = []
    by_state: dict[str, int]
    by_deployment: dict[str, int]
    by_flow: dict[str, int]
    sample: list[RunSample]
    left: dict[str, int]
    remaining: int
    stopped_reason: StoppedReason
    batches: int
    seconds: float
    runs_per_second: float
    max_runs_per_second: float
    slowdowns: int
    vacuumed_tables: list[str]
    notes: list[str]

    @classmethod
    def build(
        cls,
        totals: RetentionTotals,
        *,
        flow_names: dict[UUID, str],
        deployment_names: dict[UUID, str],
        measures_space: bool,
        **fields,
    ) -> RetentionReport:
        def flow_name(flow_id: UUID) -> str:
            return flow_names.get(flow_id, f"(deleted flow {flow_id})")

        def deployment_name(deployment_id: UUID | None) -> str:
            if deployment_id is None:
                return NO_DEPLOYMENT
            return deployment_names.get(deployment_id, f"(deleted deployment {deployment_id})")

        by_state: Counter[str] = Counter()
        by_deployment: Counter[str] = Counter()
        by_flow: Counter[str] = Counter()
        for (flow_id, deployment_id, state), count in totals.groups.items():
            by_state[state] += count
            by_deployment[deployment_name(deployment_id)] += count
            by_flow[flow_name(flow_id)] += count
        seconds = fields.pop("seconds")
        for name in ("orphan_rows_deleted", "event_rows_deleted"):
            fields[name] = _counted(fields[name])
        return cls(
            flow_runs_deleted=totals.flow_runs,
            rows_deleted=_counted(totals.rows),
            bytes_deleted=_counted(totals.bytes) if measures_space else None,
            by_state=dict(by_state.most_common()),
            by_deployment=dict(by_deployment.most_common()),
            by_flow=dict(by_flow.most_common()),
            sample=[
                RunSample(
                    id=run.id,
                    name=run.name,
                    state=run.state_type,
                    flow=flow_name(run.flow_id),
                    deployment=deployment_name(run.deployment_id),
                    finished=run.finished,
                    subflow=run.parent_task_run_id is not None,
                )
                for run in sorted(
                    totals.sample, key=lambda run: (run.finished is None, run.finished, run.name)
                )
            ],
            left=dict(totals.left.most_common()),
            batches=totals.batches,
            seconds=round(seconds, 3),
            runs_per_second=round(totals.flow_runs / seconds, 1) if seconds > 0 else 0.0,
            **fields,
        )

    def breakdown_rows(self) -> list[dict[str, object]]:
        """One row per deployment, flow and state: the table artifact."""
        return [
            {"breakdown": kind, "name": name, "flow_runs": count}
            for kind, counts in (
                ("state", self.by_state),
                ("deployment", self.by_deployment),
                ("flow", self.by_flow),
            )
            for name, count in counts.items()
        ]

    @property
    def bytes_total(self) -> int | None:
        return None if self.bytes_deleted is None else sum(self.bytes_deleted.values())

    def space_text(self) -> str:
        """What the space figure is, and when the database gives it back."""
        if self.bytes_deleted is None:
            return (
                "Space: not estimated; measuring the rows takes direct access to a PostgreSQL "
                "database (the SQL engine)."
            )
        took = "these rows take" if self.dry_run else "the deleted rows took"
        return (
            f"Space: {took} about {human_bytes(self.bytes_total)} (each row as stored, TOAST included; "
            f"their index entries come on top). {SPACE_REUSE}"
        )

    def summary(self) -> str:
        """One line, numbers first: the artifact's description and the flow's last log line."""
        verb = "would delete" if self.dry_run else "deleted"
        return (
            f"{verb} {plural(self.flow_runs_deleted, 'flow run')}"
            + (f" · {human_bytes(self.bytes_total)} of rows" if self.bytes_total else "")
            + f" · {self.engine} · {self.seconds:,.1f} s"
            + (
                f" · {plural(len(self.partitions_dropped), 'partition')} dropped"
                if self.partitions_dropped
                else ""
            )
            + (f" · {self.remaining:,} remaining" if self.remaining else "")
            + (" · dry run" if self.dry_run else "")
        )

    def to_markdown(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        title = "Retention dry run" if self.dry_run else "Retention"
        gone = "a real run would delete" if self.dry_run else "deleted"
        ages = ", ".join(
            f"{state} {days:g} {'day' if days == 1 else 'days'}"
            for state, days in self.days_per_state.items()
        )
        slowed = f", slowed down {plural(self.slowdowns, 'time')}" if self.slowdowns else ""
        lines = [
            f"# {title}: {verb} {plural(self.flow_runs_deleted, 'flow run')}",
            "",
            f"- engine: **{self.engine}** ({self.database})",
            f"- ages: {ages}",
            f"- {plural(self.batches, 'batch', 'batches')} in {self.seconds:,.1f} s "
            f"({self.runs_per_second:,.1f} runs/s; limit "
            f"{f'{self.max_runs_per_second:g} runs/s' if self.max_runs_per_second else 'none'}"
            f"{slowed})",
            f"- stopped: **{self.stopped_reason}**"
            + (
                f", {plural(self.remaining, 'expired top-level run')} {'remains' if self.remaining == 1 else 'remain'}"
                if self.remaining
                else ""
            ),
        ]
        if self.vacuumed_tables:
            lines.append(f"- maintained afterwards (VACUUM/ANALYZE): {', '.join(self.vacuumed_tables)}")
        tables = [
            (f"Rows {gone} with the runs", self.rows_deleted),
            (f"Orphaned rows {gone}", self.orphan_rows_deleted),
            (f"Events {gone}", self.event_rows_deleted),
        ]
        if self.rows_deleted:
            lines += ["", f"## {tables[0][0]}", "", self._rows_table(), "", self.space_text()]
        for heading, rows in tables[1:]:
            if rows:
                lines += ["", f"## {heading}", "", markdown_table(["rows", "table"], _swapped(rows))]
        if self.partitions_dropped:
            dropped = "Partitions a real run would drop" if self.dry_run else "Partitions dropped"
            lines += ["", f"## {dropped}", "", self._partitions_table(), "", PARTITIONS_TEXT]
        for heading, counts in (
            ("Per state", self.by_state),
            ("Per deployment", self.by_deployment),
            ("Per flow", self.by_flow),
        ):
            if counts:
                shown = list(counts.items())[:BREAKDOWN_ROWS]
                more = len(counts) - len(shown)
                lines += ["", f"## {heading}", "", markdown_table(["name", "flow runs"], shown)]
                if more > 0:
                    lines.append(f"\n… and {more} more")
        if self.left:
            lines += [
                "",
                "## Selected but left in place",
                "",
                markdown_table(["reason", "top-level runs"], self.left.items()),
            ]
        if self.sample:
            lines += [
                "",
                f"## {plural(len(self.sample), 'flow run')} {gone}, oldest first"
                + (f" (of {self.flow_runs_deleted:,})" if self.flow_runs_deleted > len(self.sample) else ""),
                "",
                markdown_table(
                    ["finished", "state", "flow run", "deployment", "flow"],
                    (
                        (
                            run.finished,
                            run.state,
                            run_link(run.name, run.id)
                            + (" (subflow: goes with its parent)" if run.subflow else ""),
                            run.deployment,
                            run.flow,
                        )
                        for run in self.sample
                    ),
                ),
            ]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def _rows_table(self) -> str:
        """Rows and their space per table, numbers first, and the total."""
        sizes = self.bytes_deleted or {}
        shown = [
            (f"{count:,}", human_bytes(sizes[table]) if table in sizes else "", table)
            for table, count in self.rows_deleted.items()
        ]
        rows = sum(count for table, count in self.rows_deleted.items() if table != REPOINTED)
        total = (f"**{rows:,}**", f"**{human_bytes(self.bytes_total)}**" if sizes else "", "**total**")
        return markdown_table(["rows", "space", "table"], [*shown, total])

    def _partitions_table(self) -> str:
        return markdown_table(
            ["rows (estimated)", "space", "partition", "of", "up to"],
            (
                (
                    "not analysed" if partition.rows_estimated is None else f"~{partition.rows_estimated:,}",
                    human_bytes(partition.bytes),
                    partition.partition,
                    partition.table,
                    f"{partition.up_to.astimezone(UTC):%Y-%m-%d %H:%M} UTC",
                )
                for partition in self.partitions_dropped
            ),
        )

    def artifacts(self) -> ReportArtifacts:
        """The readable report under its key, the breakdown as a table under its own."""
        return ReportArtifacts(
            key=REPORT_KEY,
            markdown=self.to_markdown(),
            description=self.summary(),
            table_key=BREAKDOWN_KEY,
            table=self.breakdown_rows(),
            table_description=f"Flow runs per state, deployment and flow: {self.summary()}",
        )


def _swapped(rows: Mapping[str, int]) -> list[tuple[str, str]]:
    return [(f"{count:,}", table) for table, count in rows.items()]


def _counted(rows: Mapping[str, int]) -> dict[str, int]:
    """Tables with rows, sorted by name."""
    return {table: count for table, count in sorted(rows.items()) if count}
