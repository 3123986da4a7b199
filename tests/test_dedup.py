"""pipelines.dedup: the vectorised exact/near-duplicate pass makes the same decisions as the filter's
previous per-bucket double loop (kept here as the reference), on the demo corpus and on random hash sets
with equal hashes, planted near duplicates and hot buckets; work units stay bounded."""

from __future__ import annotations

import io
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines import dedup, synthetic
from pipelines import filter as filt
from pipelines.config import FilterConfig


def reference_near(keys: list[str], hashes: list[int], max_distance: int) -> dict[str, str]:
    """The previous algorithm: per band bucket, each row against every smaller key in key order (first
    close one wins), then the smallest detail string over the bands. {key: detail}."""
    details: dict[str, list[str]] = defaultdict(list)
    for band in range(dedup.BANDS):
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, h in enumerate(hashes):
            buckets[(h >> (64 - 16 * (band + 1))) & 0xFFFF].append(i)
        for rows in buckets.values():
            rows = sorted(rows, key=lambda i: keys[i])
            for a, i in enumerate(rows):
                for j in rows[:a]:
                    d = (hashes[i] ^ hashes[j]).bit_count()
                    if d <= max_distance:
                        details[keys[i]].append(f"phash distance {d} to {keys[j]}")
                        break
    return {k: min(v) for k, v in details.items()}


def reference_exact(keys: list[str], sha: list[str]) -> dict[str, str]:
    groups: dict[str, list[str]] = defaultdict(list)
    for k, s in zip(keys, sha, strict=True):
        groups[s].append(k)
    return {k: f"same bytes as {min(g)}" for g in groups.values() for k in sorted(g)[1:]}


def decisions_of(keys, sha, hashes, cfg: FilterConfig) -> dict[str, tuple[str, str]]:
    index = pa.table({"key": keys, "shard": ["part-00000"] * len(keys), "sha256": sha,
                      "phash": [f"{h:016x}" for h in hashes]})  # fmt: skip
    table = filt.dedup_decisions(index, cfg)
    return {r["key"]: (r["reason"], r["detail"]) for r in table.to_pylist()}


def expected(keys, sha, hashes, cfg: FilterConfig) -> dict[str, tuple[str, str]]:
    out = {k: ("duplicate", d) for k, d in reference_exact(keys, sha).items()} if cfg.dedup_exact else {}
    rest = [i for i, k in enumerate(keys) if k not in out]
    near = reference_near([keys[i] for i in rest], [hashes[i] for i in rest], cfg.near_dup_max_distance)
    return {**out, **{k: ("near_duplicate", d) for k, d in near.items()}}


def random_corpus(rng: np.random.Generator, n: int, hot: bool):
    base = [int(x) for x in rng.integers(0, 2**63, size=max(1, n // 3), dtype=np.uint64)]
    hashes = []
    for _ in range(n):
        h = base[int(rng.integers(len(base)))]
        for _ in range(int(rng.integers(0, 4))):
            h ^= 1 << int(rng.integers(64))
        if hot and rng.random() < 0.5:
            h = (h & 0x0000FFFFFFFFFFFF) | (0xABCD << 48)  # one band value shared by half the rows
        hashes.append(h)
    keys = [f"{k:012d}" for k in rng.permutation(n * 10)[:n]]
    sha = [f"s{int(rng.integers(n))}" if rng.random() < 0.2 else f"u{i}" for i in range(n)]
    return keys, sha, hashes


def test_demo_corpus_decisions_equal_the_previous_algorithm(tmp_path):
    corpus = synthetic.make_corpus(tmp_path, n_images=300, seed=0)
    keys, sha, hashes = [], [], []
    for i, e in enumerate(corpus.entries):
        data = (tmp_path / e.path).read_bytes() if e.path else b""
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                hashes.append(filt.phash(im.convert("RGB")))
        except Exception:
            continue
        keys.append(f"{i:012d}")
        sha.append(str(hash(data)))
    assert len(keys) > 250
    cfg = FilterConfig(near_dup_max_distance=3)
    got = decisions_of(keys, sha, hashes, cfg)
    assert got == expected(keys, sha, hashes, cfg)
    assert sum(r == "near_duplicate" for r, _ in got.values()) > 0  # the corpus plants near duplicates
    assert sum(r == "duplicate" for r, _ in got.values()) > 0


@pytest.mark.parametrize("seed", range(12))
def test_random_hashes_equal_the_previous_algorithm(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    keys, sha, hashes = random_corpus(rng, int(rng.integers(2, 300)), hot=seed % 2 == 0)
    if seed % 3 == 0:  # tiny limits: every bucket is a "big" one, cut into blocks and chunks
        monkeypatch.setattr(dedup, "SMALL_BUCKET", 3)
        monkeypatch.setattr(dedup, "BLOCK_ROWS", 5)
        monkeypatch.setattr(dedup, "CHUNK_COLS", 4)
    cfg = FilterConfig(near_dup_max_distance=int(rng.integers(0, 12)), dedup_exact=seed % 4 != 1)
    assert decisions_of(keys, sha, hashes, cfg) == expected(keys, sha, hashes, cfg)


def test_detail_order_puts_distance_10_before_2():
    # The detail strings compare as text: "phash distance 10 to b" < "phash distance 2 to a".
    keys = ["a", "b", "c"]
    a = 0
    b = (1 << 10) - 1  # distance 10 to a, shares bands 0-2
    c = a ^ (0b11 << 62) ^ ((1 << 10) - 1)  # distance 2 to b (band 3) ... and 12 to a
    got = decisions_of(keys, ["1", "2", "3"], [a, b, c], FilterConfig(near_dup_max_distance=12))
    assert got == expected(keys, ["1", "2", "3"], [a, b, c], FilterConfig(near_dup_max_distance=12))


def test_hot_bucket_is_split_into_bounded_units():
    rng = np.random.default_rng(0)
    n = 20_000
    hashes = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    hashes[: n // 2] = (hashes[: n // 2] & np.uint64(0x0000FFFFFFFFFFFF)) | np.uint64(0xABCD << 48)
    values = dedup.band_values(np.sort(hashes), 0)
    units = dedup.plan_units(0, dedup.bucket_bounds(np.sort(values)))
    big = [u for u in units if not u.buckets]
    assert len(big) >= (n // 2) // dedup.BLOCK_ROWS - 1  # the 10k-row bucket is about 10 units
    assert max(u.i1 - u.i0 for u in big) <= dedup.BLOCK_ROWS
    # equal hashes fold: 10k copies of one placeholder cost one row, and all are its duplicates
    same = np.full(10_000, 0x1234, np.uint64)
    rows, partners, dists = dedup.near_duplicates(same, 3)
    assert len(rows) == 9_999 and set(partners) == {0} and set(dists) == {0}


def test_exact_duplicates_keep_the_smallest_key():
    dup, of = dedup.exact_duplicates(
        pa.array(["0003", "0001", "0002", "0004"]), pa.array(["s", "s", "s", "t"])
    )
    assert sorted(zip(dup.tolist(), of.tolist(), strict=True)) == [(0, 1), (2, 1)]
