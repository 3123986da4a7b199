"""Exact and near-duplicate decisions over a whole corpus, vectorised, with no quadratic hot spot.

Pure numpy/pyarrow (no Ray here): `pipelines.filter` runs the work units as Ray tasks, the tests and
`bench/scale.py` call the same functions in one process.

Decisions (the same as the filter has always made; `tests/test_dedup.py` checks them against a plain
double loop):
- exact: rows with the same sha256 keep the smallest key; the others are `duplicate` of it.
- near: among the exact survivors, a row is `near_duplicate` when a row with a smaller key within
  `max_distance` bits shares one of the 4 bands of 16 hash bits with it (two hashes within 3 bits always
  share a band). In each band the partner is the smallest such key; across bands the row keeps the
  smallest detail string ``"phash distance {d} to {key}"``.

Cost. Rows with equal hashes are folded into one first (placeholder pictures, flat colours: the hottest
buckets), which is exact: a later copy's partner is its first copy's partner, or that first copy at
distance 0. Buckets are then compared with numpy XOR + popcount: small buckets batched into one padded
array, big buckets split into blocks of rows that are separate work units, so a bucket of 100k rows is
about 100 units of equal size instead of one task of 5e9 Python comparisons.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BANDS = 4  # 64-bit hash = 4 bands of 16 bits; two hashes within distance <= 3 always share a band
BAND_BITS = 64 // BANDS
SMALL_BUCKET = 1024  # buckets up to this size are compared whole, several per padded array
BLOCK_ROWS = 1024  # rows of a big bucket per work unit
CHUNK_COLS = 8192  # earlier rows compared at once in a big bucket
PAD_ELEMENTS = 1 << 22  # elements of one padded [buckets, m, m] comparison (uint8: 4 MB)
UNIT_PAIRS = 1 << 26  # comparisons per work unit (about 0.1 s of numpy)
# Order of "phash distance {d} to {key}" strings: by str(d) first (so 10 sorts before 2), then by key.
_DISTANCE_ORDER = np.argsort(np.argsort([f"{d} " for d in range(65)], kind="stable"), kind="stable")


def hex_hashes(values: Iterable[str]) -> np.ndarray:
    """16-hex-digit perceptual hashes -> uint64."""
    return np.fromiter((int(h, 16) for h in values), dtype=np.uint64)


def band_values(hashes: np.ndarray, band: int) -> np.ndarray:
    """Band `band` of every hash (band 0 = the 16 most significant bits, hex digits 0-3)."""
    shift = np.uint64(64 - BAND_BITS * (band + 1))
    return ((hashes >> shift) & np.uint64((1 << BAND_BITS) - 1)).astype(np.int64)


# ----------------------------------------------------------------------------- exact duplicates


def exact_duplicates(
    keys: pa.Array | pa.ChunkedArray, sha256: pa.Array | pa.ChunkedArray
) -> tuple[np.ndarray, np.ndarray]:
    """(duplicate rows, the row each one duplicates): rows sharing a sha256 keep the smallest key."""
    table = pa.table({"sha": sha256, "key": keys})
    order = pc.sort_indices(table, [("sha", "ascending"), ("key", "ascending")]).to_numpy()
    sha = table.column("sha").take(order).combine_chunks()
    if len(sha) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    same = pc.equal(sha.slice(1), sha.slice(0, len(sha) - 1)).to_numpy(zero_copy_only=False)
    same = np.concatenate([[False], same])
    group_first = np.maximum.accumulate(np.where(~same, np.arange(len(sha)), 0))
    return order[same].astype(np.int64), order[group_first[same]].astype(np.int64)


# ----------------------------------------------------------------------------- work units


@dataclass(frozen=True)
class Unit:
    """Compare rows [i0, i1) of the band-sorted hashes with the earlier rows of their bucket.

    `buckets`: (start, end) of whole small buckets to compare (i0/i1 unused), or empty for a block
    of one big bucket that starts at `start`."""

    band: int
    buckets: tuple[tuple[int, int], ...] = ()
    start: int = 0
    i0: int = 0
    i1: int = 0

    @property
    def pairs(self) -> int:
        if self.buckets:
            return sum((e - s) * (e - s - 1) // 2 for s, e in self.buckets)
        return (self.i1 - self.i0) * ((self.i0 + self.i1) // 2 - self.start)


def bucket_bounds(sorted_values: np.ndarray) -> np.ndarray:
    """[start, end) of every run of equal values (buckets with one row compare nothing, dropped)."""
    n = len(sorted_values)
    if n == 0:
        return np.zeros((0, 2), np.int64)
    starts = np.flatnonzero(np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]]))
    ends = np.append(starts[1:], n)
    keep = ends - starts > 1
    return np.stack([starts[keep], ends[keep]], axis=1)


def plan_units(band: int, bounds: np.ndarray) -> list[Unit]:
    """Work units of one band: small buckets batched by size, big buckets cut into row blocks."""
    units: list[Unit] = []
    sizes = bounds[:, 1] - bounds[:, 0]
    small = np.flatnonzero(sizes <= SMALL_BUCKET)
    batch: list[tuple[int, int]] = []
    pairs = 0
    for b in small[np.argsort(sizes[small], kind="stable")]:
        s, e = int(bounds[b, 0]), int(bounds[b, 1])
        batch.append((s, e))
        pairs += (e - s) * (e - s - 1) // 2
        if pairs >= UNIT_PAIRS:
            units.append(Unit(band, tuple(batch)))
            batch, pairs = [], 0
    if batch:
        units.append(Unit(band, tuple(batch)))
    for b in np.flatnonzero(sizes > SMALL_BUCKET):
        s, e = int(bounds[b, 0]), int(bounds[b, 1])
        for i0 in range(s + 1, e, BLOCK_ROWS):
            units.append(Unit(band, start=s, i0=i0, i1=min(i0 + BLOCK_ROWS, e)))
    return units


def group_units(units: Sequence[Unit], pairs_per_task: int = UNIT_PAIRS) -> list[list[Unit]]:
    """Units packed into tasks of about `pairs_per_task` comparisons each."""
    tasks: list[list[Unit]] = []
    current: list[Unit] = []
    pairs = 0
    for u in units:
        current.append(u)
        pairs += u.pairs
        if pairs >= pairs_per_task:
            tasks.append(current)
            current, pairs = [], 0
    if current:
        tasks.append(current)
    return tasks


# ----------------------------------------------------------------------------- comparisons


def _small_buckets(hashes: np.ndarray, buckets: Sequence[tuple[int, int]], max_distance: int):
    """Whole small buckets, several per padded array: (rows, partner rows, distances) in sorted order."""
    rows, partners, dists = [], [], []
    i = 0
    while i < len(buckets):
        m = buckets[i][1] - buckets[i][0]
        j = i
        while j < len(buckets) and (j - i + 1) * max(m, buckets[j][1] - buckets[j][0]) ** 2 <= PAD_ELEMENTS:
            m = max(m, buckets[j][1] - buckets[j][0])
            j += 1
        j = max(j, i + 1)
        group = buckets[i:j]
        starts = np.array([s for s, _ in group])
        lengths = np.array([e - s for s, e in group])
        offs = np.arange(m)
        valid = offs[None, :] < lengths[:, None]  # [nb, m]
        idx = np.where(valid, starts[:, None] + offs[None, :], 0)
        h = hashes[idx]
        dist = np.bitwise_count(h[:, :, None] ^ h[:, None, :])  # [nb, m, m] uint8
        close = (dist <= max_distance) & np.tri(m, m, -1, dtype=bool)[None] & valid[:, None, :]
        close &= valid[:, :, None]
        found = close.any(axis=2)
        first = close.argmax(axis=2)
        b, r = np.nonzero(found)
        rows.append(idx[b, r])
        partners.append(idx[b, first[b, r]])
        dists.append(dist[b, r, first[b, r]])
        i = j
    return rows, partners, dists


def _block(hashes: np.ndarray, start: int, i0: int, i1: int, max_distance: int):
    """Rows [i0, i1) of a big bucket against the bucket's earlier rows, in order, chunk by chunk."""
    h = hashes[i0:i1]
    best = np.full(i1 - i0, -1, np.int64)
    best_d = np.zeros(i1 - i0, np.uint8)
    for c0 in range(start, i1 - 1, CHUNK_COLS):
        todo = np.flatnonzero(best < 0)
        if not len(todo):
            break
        c1 = min(c0 + CHUNK_COLS, i1 - 1)
        cols = np.arange(c0, c1)
        dist = np.bitwise_count(h[todo, None] ^ hashes[None, c0:c1])
        close = (dist <= max_distance) & (cols[None, :] < (i0 + todo)[:, None])
        hit = close.any(axis=1)
        first = close.argmax(axis=1)
        t = todo[hit]
        best[t] = c0 + first[hit]
        best_d[t] = dist[hit, first[hit]]
    found = np.flatnonzero(best >= 0)
    return [i0 + found], [best[found]], [best_d[found]]


def run_units(
    hashes: np.ndarray, units: Sequence[Unit], max_distance: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run work units over one band's sorted hashes: (rows, partner rows, distances), sorted positions."""
    rows, partners, dists = [], [], []
    for u in units:
        if u.buckets:
            r, p, d = _small_buckets(hashes, u.buckets, max_distance)
        else:
            r, p, d = _block(hashes, u.start, u.i0, u.i1, max_distance)
        rows += r
        partners += p
        dists += d
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return np.concatenate(rows), np.concatenate(partners), np.concatenate(dists).astype(np.uint8)


# ----------------------------------------------------------------------------- near duplicates


Runner = Callable[[np.ndarray, list[list[Unit]], int], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]


def local_runner(hashes: np.ndarray, tasks: list[list[Unit]], max_distance: int):
    return [run_units(hashes, t, max_distance) for t in tasks]


def near_duplicates(
    hashes: np.ndarray, max_distance: int, runner: Runner = local_runner
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Near duplicates of hashes given in key order: (rows, partner rows, distances), partner < row.

    `runner(sorted_hashes, tasks, max_distance)` runs the tasks of one band and returns their results in
    order (`local_runner` here; Ray tasks in `pipelines.filter`).
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(hashes)
    # Fold equal hashes: each value's first row (smallest key) stands for all its copies.
    uniq, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    # Best partner per row so far, as (distance order, partner row); n = none.
    best_rank = np.full(n, 255, np.int64)
    best_row = np.full(n, n, np.int64)
    best_d = np.zeros(n, np.uint8)
    is_copy = first[inverse] != np.arange(n)  # rows that are not their value's first row
    for band in range(BANDS):
        values = band_values(uniq, band)
        order = np.lexsort((first, values))  # by band value, then key order
        sorted_hashes = uniq[order]
        tasks = group_units(plan_units(band, bucket_bounds(values[order])))
        rep_partner = np.full(len(uniq), -1, np.int64)  # partner row of each unique value in this band
        rep_d = np.zeros(len(uniq), np.uint8)
        for r, p, d in runner(sorted_hashes, tasks, max_distance):
            rep_partner[order[r]] = first[order[p]]
            rep_d[order[r]] = d
        # This band's partner of every row: its value's partner, else (for a copy) the value's first row.
        partner = rep_partner[inverse]
        d = rep_d[inverse]
        use_first = (partner < 0) & is_copy
        partner[use_first] = first[inverse[use_first]]
        d[use_first] = 0
        has = partner >= 0
        rank = np.where(has, _DISTANCE_ORDER[d], 255)
        better = has & ((rank < best_rank) | ((rank == best_rank) & (partner < best_row)))
        best_rank[better], best_row[better], best_d[better] = rank[better], partner[better], d[better]
    rows = np.flatnonzero(best_row < n)
    return rows, best_row[rows], best_d[rows]
