"""What deleting artifacts does to their keys' artifact collections, counted alike by a dry
run and a real run, with either engine.

An artifact collection (one row per artifact key) points at its key's latest artifact.
When that artifact goes, the collection is re-pointed at the key's newest artifact left,
or removed when none is left: the SQL engine does it in the batch's transaction
(`PrefectDatabase.repair_collections`, which also repairs a collection of the batch's keys
that pointed at a missing artifact already), the server does it on each
`DELETE /artifacts/{id}` for the API engine (`ApiArtifacts`).

The report counts each collection once, by what became of it by the end of the run:
removed, or re-pointed at an older artifact of its key (a collection re-pointed in one
batch and removed in a later one counts as removed). A dry run deletes nothing, so
`CollectionForecast` follows each key its batches would touch: the collection's latest
artifact, the key's artifacts and how many of them the run would have deleted so far.
That is what decides the outcome: once the latest artifact is gone, only whether any
artifact of the key is left matters, not which one the collection then points at. Its
memory is a few numbers per key touched, never the artifacts themselves.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from tasks.prefect_api import PAGE_SIZE, PrefectApiError, chunks

# The report's rows for collections: those removed, and those now pointing at another artifact.
REMOVED = "artifact_collection"
REPOINTED = "artifact_collection re-pointed"


@dataclass
class CollectionChanges:
    """The collections one batch removed and re-pointed, by key."""

    removed: set[str] = field(default_factory=set)
    repointed: set[str] = field(default_factory=set)

    def counts(self) -> dict[str, int]:
        return {REMOVED: len(self.removed), REPOINTED: len(self.repointed)}


@dataclass
class CollectionTally:
    """The run's collections, each counted once by its last change."""

    removed: int = 0
    # Keys only for collections re-pointed: a later batch may still remove them.
    repointed: set[str] = field(default_factory=set)

    def add(self, changes: CollectionChanges) -> None:
        self.removed += len(changes.removed)
        self.repointed = (self.repointed | changes.repointed) - changes.removed

    def counts(self) -> dict[str, int]:
        return {REMOVED: self.removed, REPOINTED: len(self.repointed)}


@dataclass
class _FollowedKey:
    # None once re-pointed (or, for the SQL engine, pointing at a missing artifact): the
    # collection changes again only when the key has no artifact left.
    latest_id: UUID | None
    artifacts: int | None = None
    deleted: int = 0


# Per key, the collection's latest artifact id and whether that artifact exists.
ReadLatest = Callable[[list[str]], Awaitable[dict[str, tuple[UUID, bool]]]]
# Per key, how many artifacts it has.
CountArtifacts = Callable[[list[str]], Awaitable[dict[str, int]]]


class CollectionForecast:
    """A dry run's view of the collections its batches would change, batch after batch.

    `repairs_missing_latest`: the SQL engine also repairs a collection of a touched key that
    points at an artifact that no longer exists; the server never does."""

    def __init__(self, *, repairs_missing_latest: bool) -> None:
        self._repairs_missing_latest = repairs_missing_latest
        self._followed: dict[str, _FollowedKey] = {}
        # Keys without a collection (any more, in this dry run): nothing left to change.
        self._settled: set[str] = set()

    async def forecast(
        self,
        deleted: Iterable[tuple[UUID, str | None]],
        read_latest: ReadLatest,
        count_artifacts: CountArtifacts,
    ) -> CollectionChanges:
        """What deleting these (artifact id, key) pairs would do, after the batches before.

        Every read comes first and the memory changes last, so a batch that fails (and is
        retried) counts nothing twice."""
        by_key: dict[str, set[UUID]] = {}
        for artifact_id, key in deleted:
            if key is not None:
                by_key.setdefault(key, set()).add(artifact_id)
        keys = [key for key in sorted(by_key) if key not in self._settled]
        new_keys = [key for key in keys if key not in self._followed]
        latest = await read_latest(new_keys) if new_keys else {}
        followed = dict(self._followed)
        settled = set(self._settled)
        for key in new_keys:
            if key not in latest:
                settled.add(key)
                continue
            latest_id, exists = latest[key]
            missing = self._repairs_missing_latest and not exists
            if not exists and not missing:
                settled.add(key)  # the server leaves a collection pointing at a missing artifact
                continue
            followed[key] = _FollowedKey(None if missing else latest_id)
        keys = [key for key in keys if key in followed]
        changed = [
            key for key in keys if followed[key].latest_id is None or followed[key].latest_id in by_key[key]
        ]
        uncounted = [key for key in changed if followed[key].artifacts is None]
        counted = await count_artifacts(uncounted) if uncounted else {}
        changes = CollectionChanges()
        for key in keys:
            was = followed[key]
            now = _FollowedKey(was.latest_id, counted.get(key, was.artifacts), was.deleted + len(by_key[key]))
            if key not in changed:
                followed[key] = now
            elif (now.artifacts or 0) - now.deleted <= 0:
                del followed[key]
                settled.add(key)
                changes.removed.add(key)
            else:
                followed[key] = _FollowedKey(None, now.artifacts, now.deleted)
                changes.repointed.add(key)
        self._followed, self._settled = followed, settled
        return changes


class ApiArtifacts:
    """The API engine's artifacts: deleted through the API, and what the server then did to
    their collections read before and after (a dry run forecasts it)."""

    def __init__(
        self,
        read_all: Callable[[str, dict[str, Any]], Awaitable[list[dict[str, Any]]]],
        call: Callable[..., Awaitable[Any]],
        gather: Callable[[Iterable[Awaitable[Any]]], Awaitable[list[Any]]],
    ) -> None:
        self._all = read_all
        self._call = call
        self._gather = gather
        self._forecast = CollectionForecast(repairs_missing_latest=False)

    async def of_runs(self, flow_run_ids: Sequence[UUID]) -> list[dict[str, Any]]:
        rows = []
        for chunk in chunks(list(flow_run_ids), PAGE_SIZE):
            body = {"artifacts": {"flow_run_id": {"any_": [str(run_id) for run_id in chunk]}}}
            rows += await self._all("/artifacts/filter", body)
        return rows

    async def forecast(self, flow_run_ids: Sequence[UUID]) -> tuple[int, CollectionChanges]:
        """How many artifacts the runs have, and what deleting them would do to their collections."""
        artifacts = await self.of_runs(flow_run_ids)
        changes = await self._forecast.forecast(
            ((UUID(row["id"]), row["key"]) for row in artifacts), self._latest, self._count
        )
        return len(artifacts), changes

    async def delete(self, flow_run_ids: Sequence[UUID]) -> tuple[int, CollectionChanges]:
        """Delete the runs' artifacts; those sharing a key one after another, since the server
        re-points the key's collection on each delete and two at once could point it at the other."""
        artifacts = await self.of_runs(flow_run_ids)
        by_key: dict[str, list[str]] = {}
        for row in artifacts:
            by_key.setdefault(row["key"] or row["id"], []).append(row["id"])
        keys = sorted({row["key"] for row in artifacts if row["key"] is not None})
        before = await self._latest(keys) if keys else {}
        await self._gather(self._delete_in_turn(artifact_ids) for artifact_ids in by_key.values())
        after = await self._latest(keys) if keys else {}
        deleted = {UUID(row["id"]) for row in artifacts}
        changes = CollectionChanges()
        for key, (latest_id, _) in before.items():
            if latest_id in deleted:
                (changes.repointed if key in after else changes.removed).add(key)
        return len(artifacts), changes

    async def _latest(self, keys: list[str]) -> dict[str, tuple[UUID, bool]]:
        """The keys' collections: their latest artifact (the API cannot say whether it exists)."""
        latest = {}
        for chunk in chunks(keys, PAGE_SIZE):
            body = {"artifacts": {"key": {"any_": chunk}}}
            for row in await self._all("/artifacts/latest/filter", body):
                latest[row["key"]] = (UUID(row["latest_id"]), True)
        return latest

    async def _count(self, keys: list[str]) -> dict[str, int]:
        counts = await self._gather(
            self._call("POST", "/artifacts/count", {"artifacts": {"key": {"any_": [key]}}}) for key in keys
        )
        return {key: int(count) for key, count in zip(keys, counts, strict=True)}

    async def _delete_in_turn(self, artifact_ids: list[str]) -> None:
        for artifact_id in artifact_ids:
            try:
                await self._call("DELETE", f"/artifacts/{artifact_id}")
            except PrefectApiError as error:
                if error.status_code != 404:
                    raise
