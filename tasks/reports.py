"""Publishing reports to the Prefect UI: markdown + table artifacts under a stable key,
and a progress artifact for long work.

Every flow returns a pydantic report; this module turns it into artifacts so that the UI
shows the history of each report under its key (`retention-report`, `reconcile-report`,
`db-health-report`). Outside a flow run (plain function calls) nothing is published.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect import task
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext


def run_name(flow_name: str, changes_things: bool = True) -> Callable[[], str]:
    """A flow run name that says the flow, dry run or real, and when: the runs list then
    tells a dry run from the real one ("retention · dry run · 2026-05-26 17:56 UTC")."""

    def name() -> str:
        from prefect.runtime import flow_run

        when = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        if not changes_things:
            return f"{flow_name} · {when}"
        dry = bool((flow_run.parameters or {}).get("dry_run"))
        return f"{flow_name} · {'dry run' if dry else 'real'} · {when}"

    return name


def in_flow_run() -> bool:
    return FlowRunContext.get() is not None


async def _publish_markdown(key: str, markdown: str, description: str) -> UUID | None:
    if not in_flow_run():
        return None
    return await acreate_markdown_artifact(markdown=markdown, key=key, description=description)


async def _publish_table(key: str, rows: Sequence[Mapping[str, Any]], description: str) -> UUID | None:
    if not in_flow_run() or not rows:
        return None
    return await acreate_table_artifact(table=[dict(row) for row in rows], key=key, description=description)


@dataclass(frozen=True)
class ReportArtifacts:
    """What a flow run shows of its report: the readable markdown under one key and its
    rows as a table under another (one artifact type per key, so that each key's history
    in the UI is one kind of card), each with its one-line description."""

    key: str
    markdown: str
    description: str
    table_key: str
    table: Sequence[Mapping[str, Any]]
    table_description: str


@task(name="publish-report", cache_policy=NO_CACHE)
async def publish_report(artifacts: ReportArtifacts) -> None:
    """Every flow's report reaches the UI this one way."""
    await _publish_markdown(artifacts.key, artifacts.markdown, artifacts.description)
    await _publish_table(artifacts.table_key, artifacts.table, artifacts.table_description)


class Progress:
    """A progress artifact updated as work advances; a no-op outside a flow run."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.artifact_id: UUID | None = None

    def span(self, start: float, end: float) -> Progress:
        """This artifact, for one phase of the work: its 0-100% are `start`-`end`% of the whole."""
        return _ProgressSpan(self, start, end)

    async def update(self, percent: float) -> None:
        if not in_flow_run():
            return
        percent = max(0.0, min(100.0, float(percent)))
        if self.artifact_id is None:
            self.artifact_id = await acreate_progress_artifact(progress=percent, description=self.description)
        else:
            await aupdate_progress_artifact(self.artifact_id, progress=percent)


def minute(moment: datetime | None) -> str:
    """A time as reports show it: `2026-05-26 17:56 UTC`."""
    if moment is None:
        return "-"
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def run_link(name: str, run_id: UUID | str, kind: str = "flow-run") -> str:
    """The run's name, linked to its page in the Prefect UI when the UI's address is known."""
    from prefect.settings import get_current_settings

    ui_url = get_current_settings().ui_url
    label = name.replace("[", "(").replace("]", ")")
    return f"[{label}]({ui_url.rstrip('/')}/runs/{kind}/{run_id})" if ui_url else label


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """`1 batch`, `3 batches`."""
    return f"{count:,} {singular if count == 1 else plural_form or singular + 's'}"


class _ProgressSpan(Progress):
    def __init__(self, whole: Progress, start: float, end: float) -> None:
        self.whole, self.start, self.end = whole, start, end

    async def update(self, percent: float) -> None:
        await self.whole.update(self.start + (self.end - self.start) * max(0.0, min(100.0, percent)) / 100)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; cells are escaped so that names cannot break it."""

    def cell(value: Any) -> str:
        text = "" if value is None else minute(value) if isinstance(value, datetime) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def human_bytes(size: float | int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} TB"
