"""Bloat as arithmetic: how much bigger a relation is than its live rows need.

Bloat is reported on the scale of Prefect's maintenance guide: wasted bytes as a
percentage of the bytes the live rows need at the relation's fillfactor, so 100% means
"twice the size it needs to be" (the guide's "urgent"). A dead-tuple ratio, which the guide's
own query shows, says nothing about free space left behind by earlier vacuums; this does.

Two sources feed the same formula:
- the estimate (the method of ioguix/pgsql-bloat-estimation): row count and average row
  width from the planner's statistics (`pg_class.reltuples`, `pg_stats.avg_width` and
  `null_frac`), packed into pages the way PostgreSQL packs them;
- the measurement: `pgstattuple_approx` counts the live tuples and their bytes for real.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PAGE_HEADER_BYTES = 24
LINE_POINTER_BYTES = 4
HEAP_TUPLE_HEADER_BYTES = 23
INDEX_TUPLE_HEADER_BYTES = 8
# An index tuple with a NULL column carries a fixed 32-column null bitmap.
INDEX_NULL_BITMAP_BYTES = 4
BTREE_PAGE_SPECIAL_BYTES = 16
BTREE_METAPAGES = 1
# Every 64-bit platform PostgreSQL runs on aligns tuples to 8 bytes.
MAXIMUM_ALIGNMENT = 8
# TOAST stores values in chunks of about 2 kB, four to a page.
TOAST_CHUNKS_PER_PAGE = 4
DEFAULT_BTREE_FILLFACTOR = 90


@dataclass(frozen=True)
class Bloat:
    bytes: int
    percent: float


def aligned(size: float) -> int:
    return math.ceil(size / MAXIMUM_ALIGNMENT) * MAXIMUM_ALIGNMENT


def bloat_between(actual_bytes: int, needed_bytes: int, block_size: int) -> Bloat:
    """Wasted bytes and their share of the needed size; an empty relation needs one page."""
    needed = max(needed_bytes, block_size)
    wasted = max(actual_bytes - needed, 0)
    return Bloat(bytes=wasted, percent=round(100.0 * wasted / needed, 1))


def estimate_table_bloat(
    *,
    block_size: int,
    heap_pages: int,
    toast_pages: int,
    rows: float,
    toast_rows: float,
    columns: int,
    data_width: float,
    has_nulls: bool,
    fillfactor: int,
) -> Bloat:
    """The statistics-based estimate for one table (heap and TOAST together)."""
    header = HEAP_TUPLE_HEADER_BYTES + (math.ceil(columns / 8) if has_nulls else 0)
    tuple_bytes = LINE_POINTER_BYTES + aligned(header) + aligned(data_width)
    usable_per_page = (block_size - PAGE_HEADER_BYTES) * fillfactor / 100
    needed_pages = math.ceil(rows * tuple_bytes / usable_per_page) + math.ceil(
        toast_rows / TOAST_CHUNKS_PER_PAGE
    )
    return bloat_between((heap_pages + toast_pages) * block_size, needed_pages * block_size, block_size)


def estimate_btree_bloat(
    *, block_size: int, pages: int, rows: float, data_width: float, has_nulls: bool, fillfactor: int
) -> Bloat:
    """The statistics-based estimate for one B-tree index (leaf level; inner pages are ~1%)."""
    header = INDEX_TUPLE_HEADER_BYTES + (INDEX_NULL_BITMAP_BYTES if has_nulls else 0)
    tuple_bytes = LINE_POINTER_BYTES + aligned(header) + aligned(data_width)
    usable_per_page = (block_size - PAGE_HEADER_BYTES - BTREE_PAGE_SPECIAL_BYTES) * fillfactor / 100
    tuples_per_page = max(math.floor(usable_per_page / tuple_bytes), 1)
    needed_pages = BTREE_METAPAGES + math.ceil(rows / tuples_per_page)
    return bloat_between(pages * block_size, needed_pages * block_size, block_size)


def measured_table_bloat(*, block_size: int, relations: list[tuple[int, int, int, int]]) -> Bloat:
    """The figure from pgstattuple: `relations` holds (bytes, live tuples, live tuple bytes,
    fillfactor) for the heap and, when there is one, its TOAST table."""
    actual = 0
    needed_pages = 0
    for relation_bytes, live_tuples, live_tuple_bytes, fillfactor in relations:
        usable_per_page = (block_size - PAGE_HEADER_BYTES) * fillfactor / 100
        actual += relation_bytes
        needed_pages += math.ceil((live_tuple_bytes + LINE_POINTER_BYTES * live_tuples) / usable_per_page)
    return bloat_between(actual, needed_pages * block_size, block_size)
