"""End to end: the whole data preparation on a local Ray cluster, real img2dataset against a local
HTTP server, real open_clip (tiny ViT loaded from a weights file), real Parquet.

One prepare run (module fixture) is checked from several angles: per-shard and total accounting,
what happened to every kind of bad input, teacher features against a direct open_clip forward,
training-shard layout, and a rerun that skips everything and changes no byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from breen import shard_format as sf
from pipelines import graph, layout, prepare
from pipelines.config import load_config
from tests.conftest import CONFIGS

pytestmark = pytest.mark.slow
PRETRAIN = [s.name for s in graph.chain("pretrain")]  # steps that reject rows


@pytest.fixture(scope="module")
def prepared(prepared_demo):
    return prepared_demo


def all_rows(dataset: Path, columns: list[str], rejected: bool = False) -> list[dict]:
    d = dataset / layout.REJECTED if rejected else dataset
    rows = []
    for f in sorted(d.glob("part-*.parquet")):
        names = pq.read_schema(f).names
        rows += pq.read_table(f, columns=[c for c in columns if c in names]).to_pylist()
    return rows


def test_every_shard_and_the_total_balance(prepared):
    cfg, acc, _, _ = prepared
    for step in graph.DATASETS:
        stats = layout.read_stats(Path(cfg.out.path) / step)
        assert stats, step
        for s in stats:
            assert s["rows_in"] == s["kept"] + sum(s["rejected"].values()), (step, s)
            kept = pq.read_metadata(Path(cfg.out.path) / step / f"{s['shard']}.parquet").num_rows
            rej = pq.read_metadata(Path(cfg.out.path) / step / "rejected" / f"{s['shard']}.parquet").num_rows
            assert (kept, rej) == (s["kept"], sum(s["rejected"].values())), (step, s)
    urls = pq.read_table(cfg.input.urls[0])
    p = acc["pretrain"]
    assert p["input_rows"] == urls.num_rows == p["kept"] + p["rejected"]
    # Keys: no row is lost or duplicated between the URL list and kept + rejected of all steps.
    keys = Counter()
    for step in PRETRAIN:
        keys.update(r["key"] for r in all_rows(Path(cfg.out.path) / step, ["key"], rejected=True))
    keys.update(r["key"] for r in all_rows(Path(cfg.out.path) / "shards", ["key"]))
    assert len(keys) == urls.num_rows and set(keys.values()) == {1}


def test_bad_inputs_are_rejected_with_the_right_reason(prepared):
    cfg, _, _, _ = prepared
    fate: dict[str, tuple[str, str]] = {}
    for step in PRETRAIN:
        for r in all_rows(Path(cfg.out.path) / step, ["key", "reason"], rejected=True):
            fate[r["key"]] = (step, r["reason"])
    kept = {r["key"]: r for r in all_rows(Path(cfg.out.path) / "shards", ["key", "width", "height"])}
    by_tag: dict[str, list] = defaultdict(list)
    groups: dict[str, list] = defaultdict(list)
    src = [r for f in sorted((Path(cfg.out.path) / "download" / "_input").glob("*.arrow"))
           for r in pa.ipc.open_file(f).read_all().select(["key", "expect", "dup_group"]).to_pylist()]  # fmt: skip
    for r in src:
        outcome = ("kept", None) if r["key"] in kept else fate[r["key"]]
        by_tag[r["expect"]].append(outcome)
        if r["dup_group"]:
            groups[r["dup_group"]].append(outcome)
    expected = {
        "corrupt": {("download", "decode_error")},
        "truncated": {("download", "decode_error")},
        "zero_byte": {("download", "decode_error")},
        "not_image": {("download", "decode_error")},
        "bomb": {("download", "decode_error")},
        "http_404": {("download", "download_error")},
        "conn_refused": {("download", "download_error")},
        "tiny": {("filter", "too_small")},
        "wide": {("filter", "too_small"), ("filter", "aspect_ratio")},
        "non_english": {("filter", "language"), ("filter", "caption_too_short")},  # zh: no spaces, 1 "word"
        "empty_caption": {("captions", "empty_caption")},
        "whitespace_caption": {("captions", "empty_caption")},
        "one_word_caption": {("filter", "caption_too_short")},
        "boilerplate_caption": {("captions", "empty_caption"), ("filter", "caption_too_short")},
        "large": {("kept", None)},
        "small": {("kept", None)},
        "html_caption": {("kept", None)},
        "url_caption": {("kept", None)},
        "mojibake_caption": {("kept", None)},
        "long_caption": {("kept", None)},
    }
    for tag, allowed in expected.items():
        assert by_tag[tag], f"corpus has no {tag!r} rows"
        assert set(by_tag[tag]) <= allowed, (tag, by_tag[tag])
    ok = Counter(by_tag["ok"])
    assert ok[("kept", None)] >= 0.95 * sum(ok.values()), ok
    # Exactly one copy of each duplicate group survives; the others are (near) duplicates.
    for g, outcomes in groups.items():
        c = Counter(outcomes)
        assert c[("kept", None)] == 1, (g, outcomes)
        dup = ("filter", "duplicate") if g.startswith("exact") else ("filter", "near_duplicate")
        assert c[dup] == len(outcomes) - 1, (g, outcomes)
    for r in kept.values():
        assert max(r["width"], r["height"]) <= 672


def test_images_are_downscaled_never_upscaled(prepared):
    cfg, _, _, _ = prepared
    rows = all_rows(Path(cfg.out.path) / "download", ["expect", "width", "height", "original_width", "original_height"])
    for r in rows:
        long_side = max(r["original_width"], r["original_height"])
        assert max(r["width"], r["height"]) == min(long_side, 672), r


def _reference_features(weights: Path, image: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Independent path: own canvas (the released BREEN code's rule), a forward hook on the last block,
    reshape-mean pooling."""
    import open_clip
    import torch

    open_clip.add_model_config(str(CONFIGS / "tiny-vit.json"))
    model = open_clip.create_model("tiny-vit", pretrained=str(weights)).eval()
    img = Image.open(io.BytesIO(image)).convert("RGB")
    w, h = img.size
    patches = math.ceil(336 * min(w, h) / max(w, h) / 14)  # short side rounded up to whole 14-px patches
    nw, nh = (336, 14 * patches) if w >= h else (14 * patches, 336)
    mean = torch.tensor(open_clip.constants.OPENAI_DATASET_MEAN)
    std = torch.tensor(open_clip.constants.OPENAI_DATASET_STD)
    rgb = torch.tensor([int(255 * m) for m in open_clip.constants.OPENAI_DATASET_MEAN], dtype=torch.uint8)
    canvas = rgb.repeat(336, 336, 1)  # [336, 336, 3] of (122, 116, 104)
    pad = (24 - patches) // 2 * 14  # whole patches before the image
    top, left = (pad, 0) if w > h else (0, pad)
    canvas[top : top + nh, left : left + nw] = torch.tensor(
        np.asarray(img.resize((nw, nh), Image.Resampling.BICUBIC))
    )
    x = ((canvas.double() / 255).float() - mean) / std
    canvas = x.permute(2, 0, 1)  # [3, 336, 336]
    grabbed = {}
    hook = model.visual.transformer.resblocks[-1].register_forward_hook(lambda m, i, o: grabbed.update(out=o))
    with torch.no_grad():
        model.visual(canvas[None])
    hook.remove()
    tokens = grabbed["out"][0, 1:]  # [576, D], CLS dropped
    grid = tokens.reshape(24, 24, -1)
    fine = grid.reshape(8, 3, 8, 3, -1).mean(dim=(1, 3)).reshape(64, -1)
    coarse = grid.reshape(6, 4, 6, 4, -1).mean(dim=(1, 3)).reshape(36, -1)
    return fine.numpy(), coarse.numpy()


def test_teacher_features_equal_a_direct_open_clip_forward(prepared):
    cfg, _, _, weights = prepared
    f = sorted((Path(cfg.out.path) / "shards").glob("part-*.parquet"))[0]
    table = pq.read_table(f)  # plain pyarrow, no Ray
    images = sf.resolve_images(table, sf.images_dir(f))  # the bytes the download step stored
    meta = table.schema.metadata
    assert meta[b"breen.teacher"] == b"tiny-vit"
    assert (
        meta[b"breen.teacher_weights"].decode()
        == "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    )
    assert meta[b"breen.preprocess"] == b"letterbox-336-released-v2"
    (fine, valid), (coarse, _) = (
        sf.tensor_values(table.column("fine")),
        sf.tensor_values(table.column("coarse")),
    )
    assert valid.all()
    assert fine.dtype == np.float16 and fine.shape[1:] == (64, 64) and coarse.shape[1:] == (36, 64)
    for i in [0, table.num_rows // 2, table.num_rows - 1]:
        ref_f, ref_c = _reference_features(weights, images[i])
        for got, ref in [(fine[i], ref_f), (coarse[i], ref_c)]:
            # float16 rounding: relative 2^-11, plus fp32 noise from a different code path.
            np.testing.assert_allclose(got.astype(np.float32), ref, rtol=2**-10, atol=2e-3)
    manifest = json.loads((Path(cfg.out.path) / "shards" / "manifest.json").read_text())
    assert manifest["teacher"]["weights"] == meta[b"breen.teacher_weights"].decode()


def test_training_shards_layout(prepared):
    cfg, acc, _, _ = prepared
    files = sorted((Path(cfg.out.path) / "shards").glob("part-*.parquet"))
    sizes = [pq.read_metadata(f).num_rows for f in files]
    assert all(s == 16 for s in sizes[:-1]) and 0 < sizes[-1] <= 16
    assert sum(sizes) == acc["steps"]["shards"]["kept"]
    keys = [k for f in files for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    t = pq.read_table(files[0])
    assert {"key", "image_shard", "image_row", "caption", "fine", "coarse"} <= set(t.column_names)
    assert "image" not in t.column_names  # referenced in download/, never copied
    assert t.schema.metadata[b"breen.teacher"] == b"tiny-vit"
    sft = pq.read_table(sorted((Path(cfg.out.path) / "sft_shards").glob("part-*.parquet"))[0])
    assert "conversations" in sft.column_names
    convs = [json.loads(c) for c in sft.column("conversations").to_pylist()]
    assert all(c[0]["from"] == "human" for c in convs)
    text_only = [i for i, row in enumerate(sft.column("image_row").to_pylist()) if row is None]
    assert text_only, "the SFT corpus has text-only records"
    assert all(sft.column("fine")[i].as_py() is None for i in text_only)


def test_report_is_written(prepared):
    cfg, acc, _, _ = prepared
    html = (Path(cfg.out.path) / "report" / "index.html").read_text()
    assert "steps not found" not in html  # the report names every missing pre-training step: none is
    assert set(acc["steps"]) == set(graph.DATASETS)
    for step, c in acc["steps"].items():  # one accounting row per step, with its manifest's counts
        row = re.search(rf"<tr><td>{step}</td>(.*?)</tr>", html)
        assert row, f"no accounting row for {step}"
        cells = re.findall(r"<td>(.*?)</td>", row.group(1))
        assert cells[:4] == [f"{c[k]:,}" for k in ("shards", "rows_in", "kept", "rejected_total")], step
    assert 'src="teacher_norms.png"' in html  # the teacher's features were read back
    assert list((Path(cfg.out.path) / "report").glob("*.png"))


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and "report" not in p.parts}  # fmt: skip


def test_rerun_skips_every_shard_and_changes_no_byte(prepared, capsys):
    cfg, acc, overrides, _ = prepared
    capsys.readouterr()
    before = _snapshot(Path(cfg.out.path))
    again = prepare.run(load_config(CONFIGS / "demo.yaml", overrides))
    after = _snapshot(Path(cfg.out.path))
    out = capsys.readouterr().out
    assert again == acc
    changed = sorted(k for k in before if before[k][0] != after.get(k, ("gone",))[0])
    assert not changed, changed
    shard_files = [k for k in before if k.endswith(".parquet") and "synthetic" not in k]
    rewritten = [k for k in shard_files if before[k][1] != after[k][1]]
    assert not rewritten, rewritten  # skipped, not recomputed
    for step in graph.DATASETS:
        assert f"[{step}]" in out
    assert "teacher on" not in out and "phase 1/3" not in out
