"""Archive before delete: where retention's `archive_to` puts the rows it deletes, and how.

`archive_to` names a Prefect storage block (`local-file-system/<name>`,
`remote-file-system/<name>`, `s3-bucket/<name>` with prefect-aws installed...) or an fsspec
URL or absolute path (`s3://bucket/prefix` with the `s3` extra, `/var/archive`). Empty: no
archive.

Layout: one gzip JSON Lines file per batch,
`retention/date=<UTC date the run started>/run=<flow run name>-<id>/batch-00001.jsonl.gz` under
the destination. Each line is one row of Prefect's database as the database has it (the
API engine writes the same table-row shape from what the API returns):
`{"table": "flow_run", "row": {"id": ..., "name": ..., ...}}`, for the tables `flow`,
`flow_run`, `flow_run_state`, `flow_run_input`, `task_run`, `task_run_state`, `log` and
`artifact`. DuckDB, pandas or `zcat | jq` read it without this project;
`tasks.retention.sql_archive` restores it.

A batch's file is written and read back (size, rows per table) before the batch's deletes
happen; any failure raises `ArchiveFailed` and the batch deletes nothing. A dry run writes
nothing and measures the bytes the files would take.
"""

from __future__ import annotations

import asyncio
import gzip
import inspect
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import fsspec
from fsspec.core import url_to_fs

from tasks.parameters import ParameterError
from tasks.reports import plural

# The tables of an archived run tree, in the order a restore inserts them.
ARCHIVED_TABLES = (
    "flow",
    "flow_run",
    "task_run",
    "artifact",
    "flow_run_state",
    "task_run_state",
    "flow_run_input",
    "log",
)
# Prefect's storage blocks that can write files: `archive_to` values starting with one of
# these are block slugs, anything else is an fsspec URL or path.
BLOCK_TYPES = (
    "local-file-system",
    "remote-file-system",
    "s3-bucket",
    "gcs-bucket",
    "azure-blob-storage-container",
    "smb",
)
BLOCK_SLUG = re.compile(rf"^({'|'.join(map(re.escape, BLOCK_TYPES))})/([\w-]+)$")


class ArchiveFailed(RuntimeError):
    """A batch's archive could not be written or read back; nothing of the batch was deleted."""


class Store(Protocol):
    """Where the files go: `write` and `read` take paths relative to the destination's root."""

    where: str

    async def write(self, path: str, content: bytes) -> None: ...

    async def read(self, path: str) -> bytes: ...


async def _resolved(value: Any) -> Any:
    """The result of a Prefect method that is `sync_compatible` (3.1) or `async_dispatch`
    (3.9): either returns a coroutine when called from async code, or already the value."""
    return await value if inspect.isawaitable(value) else value


class BlockStore:
    """A Prefect storage block, written through its own `write_path` and `read_path`."""

    def __init__(self, slug: str, block: Any) -> None:
        self.where = f"block {slug}"
        self._block = block

    async def write(self, path: str, content: bytes) -> None:
        await _resolved(self._block.write_path(path, content))

    async def read(self, path: str) -> bytes:
        return await _resolved(self._block.read_path(path))


class FsspecStore:
    """An fsspec URL or local path; each call in a worker thread, since fsspec blocks."""

    def __init__(self, url: str) -> None:
        self.where = _without_credentials(url)
        self.filesystem, self.root = url_to_fs(url)

    def _path(self, path: str) -> str:
        return f"{self.root.rstrip('/')}/{path}"

    async def write(self, path: str, content: bytes) -> None:
        def write() -> None:
            self.filesystem.makedirs(self._path(path).rpartition("/")[0], exist_ok=True)
            self.filesystem.pipe_file(self._path(path), content)

        await asyncio.to_thread(write)

    async def read(self, path: str) -> bytes:
        return await asyncio.to_thread(self.filesystem.cat_file, self._path(path))


def _without_credentials(url: str) -> str:
    """The URL without user, password or query (where keys could be)."""
    parts = urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1:  # a path (or a Windows drive)
        return url
    return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"


def check_archive_to(value: str) -> str:
    """The form of `archive_to`, checked without reaching the destination; `ValueError` names what is wrong."""
    value = value.strip()
    if not value or BLOCK_SLUG.match(value):
        return value
    if "://" not in value and not value.startswith("/"):
        raise ValueError(
            f"{value!r} is neither a storage block ({', '.join(t + '/<name>' for t in BLOCK_TYPES[:3])}...), "
            "an fsspec URL (s3://bucket/prefix) nor an absolute path"
        )
    return value


async def open_store(archive_to: str) -> Store:
    """The destination `archive_to` names, loaded (a block) or its file system found (a URL):
    a block that does not exist or a protocol whose package is missing fails here, naming
    `archive_to`, before anything is read."""
    block_slug = BLOCK_SLUG.match(archive_to)
    if block_slug:
        # Registers the core storage blocks, so that `Block.load` knows their slugs.
        import prefect.filesystems  # noqa: F401
        from prefect.blocks.core import Block

        try:
            block = await _resolved(Block.load(archive_to))
        except Exception as error:
            raise ParameterError(
                f"archive_to: cannot load the block {archive_to!r}: {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else 'no message'}"[:400]
            ) from None
        if not (hasattr(block, "write_path") and hasattr(block, "read_path")):
            raise ParameterError(f"archive_to: the block {archive_to!r} cannot write files")
        return BlockStore(archive_to, block)
    try:
        return FsspecStore(archive_to)
    except (ImportError, ValueError) as error:
        raise ParameterError(
            f"archive_to: {_without_credentials(archive_to)!r} cannot be opened: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no message'}"[:400]
        ) from None


def batch_file(rows: Mapping[str, Sequence[str]]) -> bytes:
    """A batch's rows (JSON text per row, by table) as one gzip JSON Lines file."""
    lines = (
        f'{{"table":{json.dumps(table)},"row":{row}}}\n'
        for table in ARCHIVED_TABLES
        for row in rows.get(table, ())
    )
    # Level 6: nearly the size of 9 at a third of its time.
    return gzip.compress("".join(lines).encode(), compresslevel=6)


def read_batch_file(content: bytes) -> dict[str, list[dict[str, Any]]]:
    """The rows of a batch file, by table."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for line in gzip.decompress(content).splitlines():
        if line.strip():
            record = json.loads(line)
            rows.setdefault(record["table"], []).append(record["row"])
    return rows


@dataclass
class BatchArchive:
    """The archive of one retention run: a file per batch, written and verified before its deletes."""

    store: Store
    prefix: str
    dry_run: bool
    files: int = 0
    bytes: int = 0
    rows: Counter[str] = field(default_factory=Counter)

    @classmethod
    async def open(cls, archive_to: str, run_name: str, run_id: str, *, dry_run: bool) -> BatchArchive | None:
        """The run's archive under `archive_to` (None when empty), its destination checked.
        The folder names the flow run and, since two runs may share a name, its id's start."""
        if not archive_to:
            return None
        started = datetime.now(UTC)
        safe_name = re.sub(r"[^\w.-]+", "-", f"{run_name}-{run_id[:8]}").strip("-")
        prefix = f"retention/date={started:%Y-%m-%d}/run={safe_name}"
        return cls(await open_store(archive_to), prefix, dry_run)

    @property
    def where(self) -> str:
        return f"{self.store.where}, under {self.prefix}/"

    async def keep(self, rows: Mapping[str, Sequence[str]]) -> None:
        """Write the batch's file and read it back (a dry run only measures it); raises `ArchiveFailed`."""
        if not any(rows.values()):
            return
        content = batch_file(rows)
        counts = Counter({table: len(table_rows) for table, table_rows in rows.items() if table_rows})
        if not self.dry_run:
            path = f"{self.prefix}/batch-{self.files + 1:05d}.jsonl.gz"
            try:
                await self.store.write(path, content)
                written = await self.store.read(path)
            except Exception as error:
                message = str(error).splitlines()[0] if str(error) else "no message"
                raise ArchiveFailed(
                    f"archive_to: writing {path} to {self.store.where} failed ({type(error).__name__}: "
                    f"{message[:300]}); nothing of this batch was deleted"
                ) from None
            read_back = Counter(
                {table: len(table_rows) for table, table_rows in read_batch_file(written).items()}
            )
            if len(written) != len(content) or read_back != counts:
                raise ArchiveFailed(
                    f"archive_to: {path} on {self.store.where} reads back {len(written)} bytes and "
                    f"{dict(read_back)} rows, not {len(content)} bytes and {dict(counts)}; nothing of this "
                    "batch was deleted"
                )
        self.files += 1
        self.bytes += len(content)
        self.rows.update(counts)

    def notes(self) -> list[str]:
        """For the report: where the archive went (or would go) and how big it is."""
        size = f"{self.bytes:,} bytes gzip"
        if self.dry_run:
            return [
                f"Archive (archive_to): would write {plural(self.files, 'file')}, {size} (measured: the "
                f"rows compressed as they would be written), {self.rows['flow_run']} flow runs, to {self.where}."
            ]
        return [
            f"Archive (archive_to): {plural(self.files, 'file')}, {size}, {self.rows['flow_run']} flow runs "
            f"written and read back before their deletes, in {self.where}."
        ]


def list_batch_files(source: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The batch files under `source` (a URL or path of an archive root, a run's folder or
    one file), in the order they were written."""
    filesystem, root = url_to_fs(source, **storage_options)
    if root.endswith(".jsonl.gz"):
        return filesystem, [root]
    return filesystem, sorted(path for path in filesystem.find(root) if path.endswith(".jsonl.gz"))
