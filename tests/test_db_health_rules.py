"""The health report's rules without a database: thresholds, severity, verdict, bloat arithmetic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.health.bloat import bloat_between, estimate_table_bloat, measured_table_bloat
from tasks.health.checks import CHECKS
from tasks.health.framework import AboveThreshold, InformationOnly, WhenPositive, with_unit
from tasks.health.models import Flag, verdict_of
from tasks.health.thresholds import HealthParameters, Thresholds

pytestmark = pytest.mark.no_stack


def flag(severity: str) -> Flag:
    return Flag(severity=severity, check="table_bloat", object="log", advice="VACUUM log;")


def test_verdict_is_the_worst_flag_and_information_never_counts():
    assert verdict_of([]) == "ok"
    assert verdict_of([flag("info"), flag("info")]) == "ok"
    assert verdict_of([flag("info"), flag("warning")]) == "warning"
    assert verdict_of([flag("warning"), flag("critical"), flag("info")]) == "critical"


def test_default_thresholds_are_the_guide_red_flags():
    defaults = Thresholds()
    assert (defaults.table_bloat_percent, defaults.table_bloat_percent_critical) == (50, 100)
    assert (defaults.connections_percent, defaults.connections_percent_critical) == (80, 95)
    assert (defaults.wraparound_percent, defaults.wraparound_percent_critical) == (50, 80)
    assert defaults.autovacuum_stale_hours == 24
    assert defaults.idle_in_transaction_seconds == 300
    assert defaults.blocked_query_seconds == 60


def test_every_threshold_a_check_names_exists_and_the_documented_ones_are_there():
    named = {key for check in CHECKS for key in check.severity_rule.threshold_keys}
    assert named <= set(Thresholds.model_fields)
    assert {
        "table_bloat_percent",
        "dead_tuple_percent",
        "connections_percent",
        "autovacuum_stale_hours",
        "long_transaction_seconds",
        "idle_in_transaction_seconds",
        "blocked_query_seconds",
        "wraparound_percent",
    } <= named


def test_an_unknown_threshold_is_rejected_by_name():
    with pytest.raises(
        ValueError,
        match=r"invalid health report parameters: thresholds\.tabel_bloat_percent: unknown threshold",
    ):
        HealthParameters.parse(thresholds={"tabel_bloat_percent": 30})


def test_a_warning_level_above_its_critical_level_is_rejected():
    with pytest.raises(
        ValueError, match="table_bloat_percent .* must not be above table_bloat_percent_critical"
    ):
        HealthParameters.parse(thresholds={"table_bloat_percent": 150})


def test_bad_values_name_their_parameter():
    with pytest.raises(ValueError, match=r"invalid health report parameters: top_n: "):
        HealthParameters.parse(top_n=0)
    with pytest.raises(ValueError, match=r"thresholds\.connections_percent: "):
        HealthParameters.parse(thresholds={"connections_percent": -1})


def test_overrides_replace_only_what_they_name():
    parameters = HealthParameters.parse(thresholds={"table_bloat_percent": 30, "blocked_query_seconds": 5})
    assert parameters.thresholds.table_bloat_percent == 30
    assert parameters.thresholds.blocked_query_seconds == 5
    assert parameters.thresholds.table_bloat_percent_critical == 100


def test_the_above_threshold_rule_warns_then_turns_critical():
    thresholds = Thresholds()
    bloat = AboveThreshold("table_bloat_percent")
    assert bloat.judge(50, thresholds) is None, "the guide says above 50%"
    assert bloat.judge(50.1, thresholds) == ("warning", 50)
    assert bloat.judge(100.1, thresholds) == ("critical", 100)
    assert bloat.judge("off", thresholds) is None
    connections = AboveThreshold("connections_percent", inclusive=True)
    assert connections.judge(80, thresholds) == ("warning", 80)
    assert connections.judge(95, thresholds) == ("critical", 95)
    assert AboveThreshold("blocked_query_seconds").judge(61, thresholds) == ("warning", 60)
    assert WhenPositive("warning").judge(0, thresholds) is None
    assert WhenPositive("warning").judge(3, thresholds) == ("warning", 0.0)


def test_the_estimate_of_a_table_sixty_percent_dead():
    # 200,000 rows of 101 bytes were written, 120,000 deleted, ANALYZE saw 80,000 (measured
    # on PostgreSQL 18: 3,279 heap pages). The live rows need 1,293 pages.
    bloat = estimate_table_bloat(
        block_size=8192,
        heap_pages=3279,
        toast_pages=0,
        rows=80_000,
        toast_rows=0,
        columns=5,
        data_width=101,
        has_nulls=False,
        fillfactor=100,
    )
    assert bloat.bytes == (3279 - 1293) * 8192
    assert bloat.percent == pytest.approx(153.6, abs=0.1)


@given(
    actual_pages=st.integers(min_value=0, max_value=10**7),
    needed_pages=st.integers(min_value=0, max_value=10**7),
)
def test_bloat_is_never_negative_and_zero_when_the_relation_is_no_bigger_than_needed(
    actual_pages, needed_pages
):
    bloat = bloat_between(actual_pages * 8192, needed_pages * 8192, 8192)
    assert bloat.bytes >= 0 and bloat.percent >= 0
    if actual_pages <= max(needed_pages, 1):
        assert bloat.bytes == 0


def test_the_measured_figure_counts_heap_and_toast_on_the_same_scale():
    heap_only = measured_table_bloat(block_size=8192, relations=[(3279 * 8192, 80_000, 10_240_000, 100)])
    assert heap_only.percent == pytest.approx(153.6, abs=0.1)
    # A full TOAST table: 400 chunks of 2,032 bytes fill its 100 pages, four to a page.
    with_toast = measured_table_bloat(
        block_size=8192,
        relations=[(3279 * 8192, 80_000, 10_240_000, 100), (100 * 8192, 400, 400 * 2032, 100)],
    )
    assert with_toast.bytes == heap_only.bytes
    assert with_toast.percent < heap_only.percent


def test_every_flag_says_what_its_value_is_in_its_unit():
    flagging = [check for check in CHECKS if not isinstance(check.severity_rule, InformationOnly)]
    assert [check.name for check in flagging if not check.unit and check.shows == "{value}"] == []
    shown = {check.name: check for check in CHECKS}
    assert shown["autovacuum_due"].show(117) == "117 dead rows"
    assert shown["autovacuum_due"].show(1) == "1 dead row"
    assert shown["table_bloat"].show(96.25) == "96.2% bloat"
    assert shown["autovacuum_stale"].show(26.0) == "26h since a vacuum"
    assert shown["unused_indexes"].show(16 * 1024 * 1024) == "16.0 MB index, 0 scans"
    assert shown["deadlocks"].show(1) == "1 new deadlock"
    assert shown["events_past_retention"].show(1.0) == "1 day overdue"
    assert shown["missing_prefect_indexes"].show("flow_run") == "missing on flow_run"
    assert with_unit(2.5, "day") == "2.5 days" and with_unit(None, "day") == "-"
