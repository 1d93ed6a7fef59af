"""The machinery of the health checks: the context a check reads, its query kinds, the
severity rules, the `Check` record, and the one loop (`run_checks`) that walks a catalog.

A check is a name, a query, a severity rule (which names its thresholds) and advice. The
query returns rows with an `object` (what the flag is about) and a `value`; the rule turns
a row's value into a flag or not; the advice is a template filled from the row, so it can
name the exact table, pid or setting. A new check is a new record plus its query, in the
catalog `tasks.health.checks`.

Queries come in three kinds: SQL run on the read-only connection (`sql`), a selection over
the per-table or per-index figures the survey already read (`each_table`, `each_index`), and
plain functions of the `HealthContext` (Prefect's backlog, its settings). Rows of every
check are kept in the report (`findings`); `InformationOnly` checks never flag.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncConnection

from tasks.database import describe_error
from tasks.health.models import (
    Backend,
    Flag,
    HealthReport,
    IndexFigures,
    PreviousReport,
    Severity,
    TableFigures,
)
from tasks.health.statements import rows_of
from tasks.health.thresholds import Thresholds
from tasks.reports import Progress, human_bytes

Row = dict[str, Any]


@dataclass
class HealthContext:
    """What a query may look at: the connection, the survey so far, the thresholds."""

    backend: Backend
    connection: AsyncConnection
    thresholds: Thresholds
    report: HealthReport
    server: dict[str, Any] = field(default_factory=dict)
    previous: PreviousReport | None = None
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Answers shared by several checks (Prefect's settings), fetched once.
    cache: dict[str, Any] = field(default_factory=dict)


Query = Callable[[HealthContext], Awaitable[list[Row]]]


def sql(statement: str) -> Query:
    """A query that runs `statement`; thresholds (and `minimum_bytes`) are its bind parameters."""

    async def run(context: HealthContext) -> list[Row]:
        parameters = {**context.thresholds.model_dump(), "minimum_bytes": context.thresholds.minimum_bytes}
        return await rows_of(context.connection, statement, parameters)

    return run


def each_table(select: Callable[[TableFigures, HealthContext], Row | None]) -> Query:
    async def run(context: HealthContext) -> list[Row]:
        return [row for table in context.report.tables if (row := select(table, context)) is not None]

    return run


def each_index(select: Callable[[IndexFigures, HealthContext], Row | None]) -> Query:
    async def run(context: HealthContext) -> list[Row]:
        return [row for index in context.report.indexes if (row := select(index, context)) is not None]

    return run


# --- Severity rules: how a row's value becomes a flag, or not.


@dataclass(frozen=True)
class AboveThreshold:
    """Warning above `threshold`, critical above `<threshold>_critical` when that exists;
    `inclusive` makes reaching the level enough."""

    threshold: str
    inclusive: bool = False

    @property
    def threshold_keys(self) -> tuple[str, ...]:
        critical = f"{self.threshold}_critical"
        return (self.threshold, critical) if critical in Thresholds.model_fields else (self.threshold,)

    def judge(self, value: Any, thresholds: Thresholds) -> tuple[Severity, float] | None:
        if not isinstance(value, int | float):
            return None
        levels: list[tuple[Severity, str]] = [("critical", key) for key in self.threshold_keys[1:]]
        levels.append(("warning", self.threshold))
        for severity, key in levels:
            level = getattr(thresholds, key)
            if value > level or (self.inclusive and value >= level):
                return severity, level
        return None


@dataclass(frozen=True)
class EveryRow:
    """Every row the query returns is a flag of this severity."""

    severity: Severity
    threshold_keys: tuple[str, ...] = ()

    def judge(self, value: Any, thresholds: Thresholds) -> tuple[Severity, None] | None:
        return self.severity, None


@dataclass(frozen=True)
class WhenPositive:
    """A flag of this severity when the value is a positive number."""

    severity: Severity
    threshold_keys: tuple[str, ...] = ()

    def judge(self, value: Any, thresholds: Thresholds) -> tuple[Severity, float] | None:
        return (self.severity, 0.0) if isinstance(value, int | float) and value > 0 else None


@dataclass(frozen=True)
class InformationOnly:
    """Information for the report; never a flag."""

    threshold_keys: tuple[str, ...] = ()

    def judge(self, value: Any, thresholds: Thresholds) -> None:
        return None


SeverityRule = AboveThreshold | EveryRow | WhenPositive | InformationOnly


@dataclass(frozen=True)
class Check:
    """`unit` is the unit of the value and its threshold (a symbol, `bytes`, or a noun in the
    singular: `dead row`); `shows` says what the value is, around the value with its unit."""

    name: str
    title: str
    query: Query
    severity_rule: SeverityRule
    advice: str | Mapping[Backend, str] = ""
    unit: str = ""
    shows: str = "{value}"
    backends: tuple[Backend, ...] = ("postgresql",)

    def advice_for(self, backend: Backend, row: Row) -> str:
        template = self.advice if isinstance(self.advice, str) else self.advice.get(backend, "")
        return template.format_map(_Blanks(row))

    def show(self, value: Any) -> str:
        return "-" if value is None else self.shows.format(value=with_unit(value, self.unit))


# Units written right after the number; any other unit but bytes is a noun, plural but for one.
SYMBOL_UNITS = ("%", "s", "h")


def with_unit(value: Any, unit: str) -> str:
    """`93.5%`, `26h`, `16.0 MB`, `1 dead row`, `1,234 dead rows`; text as it is."""
    if value is None:
        return "-"
    if not isinstance(value, int | float) or isinstance(value, bool):
        return str(value)
    if unit == "bytes":
        return human_bytes(value)
    number = f"{value:,.1f}".removesuffix(".0") if isinstance(value, float) else f"{value:,}"
    if unit in SYMBOL_UNITS:
        return f"{number}{unit}"
    if not unit:
        return number
    return f"{number} {unit if number == '1' else unit + 's'}"


class _Blanks(dict):
    """Advice templates name row fields; a field a row lacks reads as '-'."""

    def __missing__(self, key: str) -> str:
        return "-"


async def run_checks(
    context: HealthContext, checks: tuple[Check, ...], progress: Progress | None = None
) -> None:
    """Run every check of the context's backend; a check that fails is noted and the rest go on."""
    applicable = [check for check in checks if context.backend in check.backends]
    for position, check in enumerate(applicable, start=1):
        started = time.perf_counter()
        try:
            rows = await check.query(context)
        except Exception as error:
            context.report.notes.append(f"The check '{check.name}' could not run: {describe_error(error)}")
            continue
        finally:
            context.report.check_seconds[check.name] = round(time.perf_counter() - started, 3)
        context.report.findings[check.name] = [
            {key: _plain(value) for key, value in row.items()} for row in rows
        ]
        for row in rows:
            judged = check.severity_rule.judge(row.get("value"), context.thresholds)
            if judged is None:
                continue
            severity, threshold = judged
            context.report.flags.append(
                Flag(
                    severity=severity,
                    check=check.name,
                    object=str(row["object"]),
                    value=_plain(row.get("value")),
                    threshold=threshold,
                    unit=check.unit,
                    shown=check.show(_plain(row.get("value"))),
                    advice=check.advice_for(context.backend, row),
                )
            )
        if progress is not None:
            await progress.update(100.0 * position / len(applicable))


def _plain(value: Any) -> Any:
    """A JSON-friendly value for the report."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value
