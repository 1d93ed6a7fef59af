"""The benchmarks at a tiny size, so that their code never rots: every method deletes
exactly its slice, ours leave no orphans, and the results carry every key the README and
CI read. Timings are printed by the benchmarks, never asserted here."""

from __future__ import annotations

import json

import pytest
from conftest import serving

from bench import health, reconcile, retention
from bench.harness import BENCH_SERVER_ENVIRONMENT, write_json

REQUIRED_RETENTION_KEYS = (
    "docs_flow_runs_per_s",
    "api_delete_runs_per_s",
    "api_bulk_delete_runs_per_s",
    "prefect_db_vacuum_runs_per_s",
    "api_engine_runs_per_s",
    "sql_engine_runs_per_s",
    "sql_engine_default_runs_per_s",
    "sql_ceiling_runs_per_s",
    "probe_p99_ms_idle",
    "probe_p99_ms_during_sql_engine_default",
    "probe_p99_ms_during_api_engine",
    "orphans_left",
    "machine",
    "versions",
    "runs",
)


@pytest.fixture(scope="module")
def benchmark_server(module_server_factory):
    """One isolated server for the module, configured like the benchmarks' own."""
    return module_server_factory(extra_env=BENCH_SERVER_ENVIRONMENT)


def check_targets_and_table(benchmark, results: dict) -> None:
    """Every target of `benchmark` judged, and its markdown table has a row for each method."""
    assert len(results["targets"]) == len(benchmark.TARGETS)
    assert {target["status"] for target in results["targets"]} <= {"pass", "miss", "not measured"}
    table = benchmark.to_markdown(results)
    for name in benchmark.METHODS_BY_NAME:
        assert f"| {name} |" in table


async def test_retention_benchmark_deletes_each_slice_exactly(benchmark_server, tmp_path):
    options = retention.Options(
        runs=400, idle_seconds=1.0, log_wait_seconds=30.0, logs_gone_wait_seconds=60.0
    )
    with serving(benchmark_server):
        results = await retention.benchmark(benchmark_server, options, tmp_path / "probe-samples.txt")

    write_json(tmp_path / "retention.json", results)
    results = json.loads((tmp_path / "retention.json").read_text())
    assert set(REQUIRED_RETENTION_KEYS) <= set(results)
    assert set(results["methods"]) == set(retention.METHODS_BY_NAME)
    for name, measured in results["methods"].items():
        method = retention.METHODS_BY_NAME[name]
        assert measured["runs_deleted"] == measured["runs_expected"], name
        if method.states == retention.TERMINAL_STATES:
            assert measured["runs_expected"] == measured["slice_runs"] == results["slices"][name], name
        assert set(measured["probe"]) == {"samples", "errors", "p50_ms", "p99_ms"}, name
    for name in retention.OURS:
        assert results["orphans_left"][name] == 0, (name, results["methods"][name]["orphans"])
    # Prefect's API never deletes artifacts with their runs: the baselines leave them behind.
    assert (
        results["methods"]["api_bulk_delete"]["orphans"]["artifact"] == results["slices"]["api_bulk_delete"]
    )
    # The server deletes the logs of runs deleted through its API afterwards; timed until gone.
    for name in ("api_engine", "api_bulk_delete", "api_delete"):
        measured = results["methods"][name]
        assert measured["seconds_until_logs_gone"] >= measured["seconds"], name
        assert results[f"{name}_runs_per_s_until_logs_gone"] <= measured["runs_per_s"], name
    assert results["kept_rows_intact"] is True
    check_targets_and_table(retention, results)


async def test_reconcile_and_health_benchmarks_on_a_small_population(benchmark_server):
    with serving(benchmark_server):
        fixing = await reconcile.benchmark(benchmark_server.database_url, runs=300, stuck=8, idle_passes=1)
        reporting = await health.benchmark(benchmark_server.database_url, runs=300, passes=1, exact=False)

    assert fixing["runs"] >= 300
    assert fixing["reconcile_idle_found"] == 0
    assert sum(fixing["stuck_runs"].values()) == 8
    assert fixing["reconcile_fixed"] == 8
    assert fixing["reconcile_left_stuck"] == 0
    assert {"reconcile_idle_pass_seconds", "reconcile_fix_runs_per_s", "machine", "versions"} <= set(fixing)
    assert "| fix pass |" in reconcile.to_markdown(fixing)

    assert reporting["runs_seeded_now"] == 0, "the population is shared, not seeded twice"
    assert {"health_report_seconds", "database_bytes", "machine", "versions"} <= set(reporting)
    assert reporting["passes"][0]["verdict"] in ("ok", "warning", "critical")
    assert reporting["passes"][0]["slowest_checks"], "the checks that took longest are named"
    assert "report ≤ 15 s" in health.to_markdown(reporting)
