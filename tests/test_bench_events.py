"""The events benchmark at a tiny size, so that its code never rots: every method deletes
exactly its window, the kept events stay, the logs of the slice go from both log tables,
and the results carry every key the README reads. Timings are never asserted here."""

from __future__ import annotations

import json

import pytest
from conftest import serving
from sqlalchemy import text
from test_bench import check_targets_and_table

from bench import event_slices, events
from bench.harness import BENCH_SERVER_ENVIRONMENT, write_json
from tasks.database import connect

FIGURES = (
    "events_engine_rows_per_s",
    "events_engine_default_rows_per_s",
    "prefect_event_vacuum_rows_per_s",
    "events_ceiling_rows_per_s",
    "probe_p99_ms_idle",
    "probe_p99_ms_during_events_engine_default",
    "batch_ms_first",
    "batch_ms_last",
)
REQUIRED_KEYS = (
    "events",
    *FIGURES,
    *(events.OLD_SCHEMA + figure for figure in FIGURES),
    "logs",
    "log_batch_ms_first",
    "log_batch_ms_last",
    "log_small_table_batch_ms_first",
    "table_sizes",
    "machine",
    "versions",
)
LOG_SLICE_RUNS = 2_000


@pytest.fixture(scope="module")
def benchmark_server(module_server_factory):
    return module_server_factory(extra_env=BENCH_SERVER_ENVIRONMENT)


async def indexes(database_url: str) -> list[str]:
    async with connect(database_url) as connection:
        statement = text("SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexname")
        return list((await connection.execute(statement)).scalars())


async def test_events_benchmark_deletes_each_window_exactly(benchmark_server, tmp_path, monkeypatch):
    # Loads this big drop the indexes and build them after, as the full-size seed does.
    monkeypatch.setattr(event_slices, "BULK_LOAD_ROWS", 10_000)
    options = events.Options(events=20_000, logs=30_000, idle_seconds=1.0, log_slice_runs=LOG_SLICE_RUNS)
    schema = await indexes(benchmark_server.database_url)
    with serving(benchmark_server):
        results = await events.benchmark(benchmark_server, options, tmp_path / "probe-samples.txt")

    # Every index dropped for a load or for the 3.4-style schema is back, as it was.
    assert await indexes(benchmark_server.database_url) == schema

    write_json(tmp_path / "events.json", results)
    results = json.loads((tmp_path / "events.json").read_text())
    assert set(REQUIRED_KEYS) <= set(results)
    assert results["events"] == 20_000
    for phase in events.PHASES:
        assert set(results[f"{phase}methods"]) == set(events.METHODS_BY_NAME)
        for name, measured in results[f"{phase}methods"].items():
            assert measured["window_events"] == results["windows"][phase + name] > 0, (phase, name)
            assert measured["events_deleted"] == measured["window_events"], (phase, name)
            # Each event has its own resource row and two or three related ones.
            assert measured["event_resources_deleted"] == measured["window_event_resources"], (phase, name)
            seeded = event_slices.seeded_resources(measured["window_events"])
            assert measured["window_event_resources"] == seeded, (phase, name)
            assert measured["rows_left"] == 0, (phase, name)
            assert set(measured["probe"]) == {"samples", "errors", "p50_ms", "p99_ms"}, (phase, name)
    assert results["kept_rows_intact"] is True
    assert results["logs"] == 30_000
    for prefix in ("log_", "log_small_table_"):
        assert results[f"{prefix}deletion"]["lines_deleted"] == 10 * LOG_SLICE_RUNS, prefix
    check_targets_and_table(events, results)


async def test_a_window_that_lost_resources_is_seeded_again(benchmark_server):
    """Prefect's vacuum deletes resources before their events: a run interrupted there leaves
    a window with all its events and fewer resources, which the next run must not measure."""
    url = benchmark_server.database_url
    sizes = {"first": 1_000, "second": 500}
    await event_slices.ensure_events(url, 100, sizes, tuple(sizes))
    windows = await event_slices.ensure_events(url, 100, sizes, tuple(sizes))
    async with connect(url) as connection:
        await connection.execute(
            text(
                "DELETE FROM event_resources WHERE id IN (SELECT id FROM event_resources "
                "WHERE occurred >= :low AND occurred < :high LIMIT 10)"
            ),
            {"low": windows["first"].low, "high": windows["first"].high},
        )
        await connection.commit()
    lost = await event_slices.count_window(url, windows["first"])
    assert lost.event_resources == event_slices.seeded_resources(1_000) - 10

    windows = await event_slices.ensure_events(url, 100, sizes, tuple(sizes))
    for name, seeded in sizes.items():
        counted = await event_slices.count_window(url, windows[name])
        assert counted == event_slices.WindowCount(seeded, event_slices.seeded_resources(seeded)), name
