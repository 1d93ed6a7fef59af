"""Archive before delete, on real stores: the local file system, a local-file-system block, and
S3 (moto in server mode, reached through s3fs), with a real Prefect server and PostgreSQL.

The story of a team that must keep what it deletes: each batch is written and read back
before its deletes; the dry run writes nothing and says where and how big; a store that
fails half-way stops the run with nothing of that batch deleted; DuckDB reads the archive
as the README shows; a run deleted by mistake comes back, with its states, task runs, logs,
inputs and artifacts, and restoring it again duplicates nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import duckdb
import fsspec
import httpx
import pytest
from conftest import serving
from fsspec.implementations.local import LocalFileSystem
from history import QUICK, PlannedRun, create_history, existing, rows
from prefect.filesystems import LocalFileSystem as LocalFileSystemBlock

from deploy import PROJECT_ROOT
from flows.retention import RetentionFailed, retention
from localstack.prefect_versions import run_with_client
from localstack.stack import free_port
from tasks.database import connect
from tasks.parameters import ParameterError
from tasks.prefect_api import call, prefect_client
from tasks.retention.archive import list_batch_files, read_batch_file
from tasks.retention.sql_archive import batch_rows, restore
from tasks.settings import get_settings

BUCKET = "prefect-archive"


def readme_query(root: Path) -> str:
    """The README's DuckDB query (every archived flow run, with the retention run that
    archived it), as the README prints it, on the archive under `root`."""
    line = next(
        line
        for line in (PROJECT_ROOT / "README.md").read_text().splitlines()
        if line.startswith("duckdb -c ")
    )
    query = line.removeprefix("duckdb -c ").strip('"').replace('\\"', '"')
    return query.replace("'archive/retention/", f"'{root}/retention/")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 in server mode on a free port, with one bucket; stopped after the module."""
    port = free_port()
    environment = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                httpx.put(f"{endpoint}/{BUCKET}", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            raise RuntimeError("moto did not start")
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def s3_configured(s3_endpoint, monkeypatch) -> str:
    """s3fs pointed at moto the way a worker is (FSSPEC_S3_* settings), for this test."""
    monkeypatch.setitem(
        fsspec.config.conf, "s3", {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    )
    return f"s3://{BUCKET}/archive-{uuid.uuid4().hex[:8]}"


class FailingOnSecondWrite(LocalFileSystem):
    """The local file system, except that the second batch file of each run cannot be written."""

    protocol = "fails-on-second-batch"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix(f"{cls.protocol}://"))

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if path.endswith("batch-00002.jsonl.gz"):
            raise OSError(28, "No space left on device")
        return super().pipe_file(path, value, mode=mode, **kwargs)


async def archived_history(prefix: str, count: int) -> tuple[list[uuid.UUID], list[str]]:
    """`count` old Completed top-level runs, each with a subflow, a deployment, a keyed
    artifact, logs and a flow run input: every table an archive holds."""
    plans = []
    for index in range(count):
        plans += [
            PlannedRun("COMPLETED", 90, deployment=True, artifact_key=f"{prefix}-report"),
            PlannedRun("FAILED", 90, parent=2 * index),
        ]
    history = await create_history(prefix, plans)
    async with prefect_client() as client:
        for run_id in history.ids:
            await call(
                client, "POST", f"/flow_runs/{run_id}/input", json={"key": "approval", "value": '"yes"'}
            )
    roots = [run_id for run_id in history.ids if run_id not in history.parent_of]
    return roots, history.flow_names


async def everything_owned(run_ids: list[uuid.UUID]) -> dict[str, set[str]]:
    """Every row the runs' trees own, as PostgreSQL has it (`to_jsonb`), per table."""
    async with connect(get_settings().database_url) as connection:
        tree = {str(row.id) for row in await rows("SELECT id FROM flow_run WHERE id IN :ids", ids=run_ids)}
        children = await rows(
            "SELECT f.id FROM flow_run f JOIN task_run t ON t.id = f.parent_task_run_id WHERE t.flow_run_id IN :ids",
            ids=run_ids,
        )
        tree |= {str(row.id) for row in children}
        owned = await batch_rows(connection, [uuid.UUID(run_id) for run_id in tree])
    return {table: set(table_rows) for table, table_rows in owned.items()}


def batch_files(root: str) -> list[str]:
    return list_batch_files(root)[1]


async def test_sql_engine_archives_to_s3_before_deleting_and_restore_brings_the_runs_back(
    on_module_server, s3_configured
):
    roots, flow_names = await archived_history("archive-s3", 3)
    before = await everything_owned(roots)
    assert all(before[table] for table in ("flow_run", "task_run", "task_run_state", "log", "artifact"))
    assert len(before["flow_run_input"]) == 6

    report = await retention(
        engine="sql", flow_names=flow_names, batch_size=2, archive_to=s3_configured, **QUICK
    )

    assert report.flow_runs_deleted == 6
    assert not await existing(roots)
    files = batch_files(s3_configured)
    assert [path.rsplit("/", 1)[1] for path in files] == ["batch-00001.jsonl.gz", "batch-00002.jsonl.gz"]
    assert any("2 files" in note and s3_configured.removeprefix("s3://") in note for note in report.notes)
    archived: dict[str, list[dict]] = {}
    filesystem = fsspec.filesystem("s3")
    for path in files:
        for table, table_rows in read_batch_file(filesystem.cat_file(path)).items():
            archived.setdefault(table, []).extend(table_rows)
    assert len(archived["flow_run"]) == 6 and len(archived["flow_run_input"]) == 6

    # The run deleted by mistake first (its subflow with it), then all the others.
    first = await restore(s3_configured, get_settings().database_url, [roots[0]])
    assert len(first.restored) == 2 and await existing(roots) == {roots[0]}
    restored = await restore(s3_configured, get_settings().database_url)

    assert sorted(first.restored + restored.restored) == sorted(
        uuid.UUID(row["id"]) for row in archived["flow_run"]
    )
    assert sorted(restored.skipped) == sorted(first.restored)
    # Row for row as they were, every table, references included.
    assert await everything_owned(roots) == before
    async with prefect_client() as client:
        for root in roots:
            run = await call(client, "GET", f"/flow_runs/{root}")
            assert run["state"]["type"] == "COMPLETED"
            logs = await call(
                client, "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [str(root)]}}}
            )
            assert logs
    again = await restore(s3_configured, get_settings().database_url)
    assert not again.restored and sorted(again.skipped) == sorted(first.restored + restored.restored)
    assert await everything_owned(roots) == before


async def test_api_engine_archives_to_a_block_and_its_archive_restores_the_same_way(
    on_module_server, tmp_path
):
    roots, flow_names = await archived_history("archive-api", 2)
    before = await everything_owned(roots)
    await LocalFileSystemBlock(basepath=str(tmp_path)).save("retention-archive-api", overwrite=True)

    report = await retention(
        engine="api",
        flow_names=flow_names,
        batch_size=1,
        archive_to="local-file-system/retention-archive-api",
        **QUICK,
    )

    assert report.flow_runs_deleted == 4 and not await existing(roots)
    assert len(batch_files(str(tmp_path))) == 2
    restored = await restore("local-file-system/retention-archive-api", get_settings().database_url)
    assert len(restored.restored) == 4
    after = await everything_owned(roots)
    # Through the API, rows keep their ids and what the API returns; a few columns it does not
    # (a state's `created`) take their defaults: compare ids per table and the runs' state.
    ids = {table: {json.loads(row)["id"] for row in table_rows} for table, table_rows in before.items()}
    assert {
        table: {json.loads(row)["id"] for row in table_rows} for table, table_rows in after.items()
    } == ids
    async with prefect_client() as client:
        for root in roots:
            run = await call(client, "GET", f"/flow_runs/{root}")
            assert run["state"]["type"] == "COMPLETED" and run["deployment_id"]
    assert not (await restore(str(tmp_path), get_settings().database_url)).restored


@pytest.mark.parametrize("engine", ["sql", "api"])
async def test_a_store_failing_half_way_fails_the_run_and_deletes_nothing_of_that_batch(
    on_module_server, tmp_path, engine
):
    fsspec.register_implementation(FailingOnSecondWrite.protocol, FailingOnSecondWrite, clobber=True)
    roots, flow_names = await archived_history(f"archive-fails-{engine}", 3)

    with pytest.raises(RetentionFailed, match="archive_to: writing .*batch-00002.jsonl.gz.*No space left"):
        await retention(
            engine=engine,
            flow_names=flow_names,
            batch_size=1,
            archive_to=f"{FailingOnSecondWrite.protocol}://{tmp_path}",
            **QUICK,
        )

    # The first batch was archived and deleted; the second and third were not deleted.
    assert await existing(roots) == set(roots[1:])
    files = batch_files(str(tmp_path))
    assert len(files) == 1
    archived = read_batch_file(Path(files[0]).read_bytes())
    assert {row["id"] for row in archived["flow_run"] if not row["parent_task_run_id"]} == {str(roots[0])}


async def test_dry_run_writes_nothing_and_measures_what_the_real_run_writes(on_module_server, tmp_path):
    roots, flow_names = await archived_history("archive-dry", 2)
    parameters = {"engine": "sql", "flow_names": flow_names, "archive_to": str(tmp_path), **QUICK}

    dry = await retention(dry_run=True, **parameters)

    assert not list(tmp_path.iterdir()) and await existing(roots) == set(roots)
    (note,) = [note for note in dry.notes if note.startswith("Archive")]
    assert "would write 1 file" in note and str(tmp_path) in note
    real = await retention(**parameters)
    written = sum(Path(path).stat().st_size for path in batch_files(str(tmp_path)))
    assert f"{written:,} bytes gzip" in note
    assert any(f"{written:,} bytes gzip" in note for note in real.notes)


async def test_duckdb_reads_the_archive_with_the_readme_query(on_module_server, tmp_path):
    roots, flow_names = await archived_history("archive-duckdb", 2)
    await retention(engine="sql", flow_names=flow_names, archive_to=str(tmp_path), **QUICK)

    found = duckdb.sql(readme_query(tmp_path)).fetchall()

    assert sorted(name for name, _, _ in found) == sorted(f"archive-duckdb-run-{index}" for index in range(4))
    assert {state for _, state, _ in found} == {"Completed", "Failed"}
    assert {run for _, _, run in found} == {
        Path(batch_files(str(tmp_path))[0]).parent.name.removeprefix("run=")
    }


@pytest.mark.parametrize(
    "archive_to, problem",
    [
        ("relative/folder", "neither a storage block"),
        ("local-file-system/no-such-block", "cannot load the block"),
        ("nosuchprotocol://bucket/prefix", "cannot be opened"),
    ],
)
async def test_a_bad_archive_to_fails_before_anything_is_read(on_module_server, archive_to, problem):
    roots, flow_names = await archived_history(f"archive-bad-{uuid.uuid4().hex[:6]}", 1)

    with pytest.raises(ParameterError, match=f"archive_to: .*{problem}"):
        await retention(flow_names=flow_names, archive_to=archive_to, **QUICK)

    assert await existing(roots) == set(roots)


async def test_restore_from_the_command_line_says_what_it_skipped(on_module_server, tmp_path):
    roots, flow_names = await archived_history("archive-cli", 1)
    await retention(engine="sql", flow_names=flow_names, archive_to=str(tmp_path), **QUICK)
    # Meanwhile the runs' deployment was deleted too: the runs come back without one.
    async with prefect_client() as client:
        (deployment,) = await call(
            client,
            "POST",
            "/deployments/filter",
            json={"deployments": {"name": {"any_": ["archive-cli-deployment"]}}},
        )
        await call(client, "DELETE", f"/deployments/{deployment['id']}")
    command = [sys.executable, "-m", "tasks.retention.sql_archive", "restore", str(tmp_path)]
    environment = {**os.environ, "MAINTENANCE_DATABASE_URL": on_module_server.database_url}

    def restore_from_the_command_line() -> str:
        return subprocess.run(command, env=environment, capture_output=True, text=True, check=True).stdout

    first = await asyncio.to_thread(restore_from_the_command_line)
    second = await asyncio.to_thread(restore_from_the_command_line)

    assert first.startswith("restored 2 flow runs from 1 files")
    assert await existing(roots) == set(roots)
    async with prefect_client() as client:
        run = await call(client, "GET", f"/flow_runs/{roots[0]}")
    assert run["deployment_id"] is None and run["state"]["type"] == "COMPLETED"
    assert second.startswith("restored 0 flow runs") and str(roots[0]) in second


@pytest.mark.parametrize("engine", ["sql", "api"])
async def test_prefect_3_1_archives_to_a_block_and_restores(fresh_server, tmp_path, engine):
    """Prefect 3.1's blocks write through `sync_compatible` methods (3.9's: `async_dispatch`):
    the flow run by 3.1's client archives to a block on a 3.1 server, and its archive restores."""
    server = fresh_server(version="3.1.15")
    with serving(server):
        roots, flow_names = await archived_history(f"archive-old-{engine}", 2)
        before = await everything_owned(roots)

        def with_old_client(*arguments: str) -> str:
            result = run_with_client(
                "3.1.15",
                list(arguments),
                api_url=server.api_url,
                database_url=server.database_url,
                home=tmp_path / "home",
            )
            assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
            return result.stdout

        block = f"old-archive-{engine}"
        await asyncio.to_thread(
            with_old_client,
            "-c",
            f"from prefect.filesystems import LocalFileSystem; LocalFileSystem(basepath={str(tmp_path / 'archive')!r}).save({block!r})",
        )
        report_path = tmp_path / "report.json"
        options = ["retention", "--engine", engine, "--archive-to", f"local-file-system/{block}", "--yes"]
        options += ["--max-runs-per-second", "0", "--events-older-than-days", "none", "--no-vacuum"]
        options += [argument for name in flow_names for argument in ("--flow-name", name)]
        await asyncio.to_thread(with_old_client, "-m", "cli", *options, "--json", str(report_path))

        assert json.loads(report_path.read_text())["flow_runs_deleted"] == 4
        assert not await existing(roots)
        restored = await restore(str(tmp_path / "archive"), server.database_url)
        assert len(restored.restored) == 4
        ids = {table: {json.loads(row)["id"] for row in table_rows} for table, table_rows in before.items()}
        after = await everything_owned(roots)
        assert {
            table: {json.loads(row)["id"] for row in table_rows} for table, table_rows in after.items()
        } == ids
