"""Caption cleaning: the pure function, the per-table split, one shard through the worker, and Ray."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import fingerprint, layout
from pipelines.captions import CaptionsWorker, clean_caption, clean_table
from pipelines.config import CaptionsConfig, to_dict

CFG = CaptionsConfig()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, ""),
        ("", ""),
        ("   \n\t ", ""),
        # mojibake and entities
        ("cafÃ©", "café"),
        ("caf&#195;&#169; au lait", "café au lait"),
        ("Tom &amp;amp; Jerry", "Tom & Jerry"),
        ("Tom &amp;amp;amp;amp; Jerry", "Tom & Jerry"),
        ("AT&T store", "AT&T store"),
        ("x < y and y > z", "x < y and y > z"),
        # HTML
        ("<p>Hello <b>world</b></p><script>alert(1)</script>", "Hello world"),
        ("&lt;i&gt;A red car&lt;/i&gt;", "A red car"),
        ("line<br/>break", "line break"),
        ("a <!-- hidden --> b", "a b"),
        # URLs and e-mail
        ("Visit https://example.com/x?y=1 or www.foo.org now", "Visit or now"),
        ("A dog [http://x.com]", "A dog"),
        ("A cat (https://en.wikipedia.org/wiki/Cat_(animal)), sleeping", "A cat, sleeping"),
        ("photo example.com/img/1.jpg of a cat", "photo of a cat"),
        (
            "Sunset over the harbor https://example.com/p/123?size=large via www.example.org",
            "Sunset over the harbor",
        ),
        ("A bridge at night (source: http://x.org/a)", "A bridge at night"),
        ("contact bob.smith@example.co.uk for prints", "contact for prints"),
        ("mailto:jo@x.org", ""),
        # whitespace, controls, Unicode
        ("  a\tb\n\nc\u200bd\x00e\u00a0f  ", "a b cde f"),
        ("e\u0301cole", "\u00e9cole"),  # NFC
        ("Ｆｕｌｌｗｉｄｔｈ", "Fullwidth"),
        ("a\ud800b", "ab"),  # lone surrogate dropped
        ("\ud83d\ude00 smile", "\U0001f600 smile"),  # surrogate pair joined
        # boilerplate
        ("Dog on grass Stock Photo - Image 12345", "Dog on grass"),
        ("Happy dog stock photo 123456 | Shutterstock", "Happy dog"),
        ("Happy dog Stock Photo - Alamy", "Happy dog"),
        ("Portrait of happy dog Stock Photo - 12345678", "Portrait of happy dog"),
        ("Happy dog stock photo. Image of animal, pet, cute - 12345", "Happy dog"),
        ("Happy Dog Stock Photo - Download Image Now - Animal, Dog, Pets - iStock", "Happy Dog"),
        ("Royalty-free stock photo of a cat", "a cat"),
        ("Beautiful flowers royalty free image", "Beautiful flowers"),
        ("image may contain: 2 people, smiling", "2 people, smiling"),
        ("Sunset over the sea (click to enlarge)", "Sunset over the sea"),
        ("Click here to view larger image. A red car", "A red car"),
        ("red shoes on Etsy", "red shoes"),
        ("  - | A cat on a mat | -  ", "A cat on a mat"),
        ("Stock Photo", ""),
        # left alone
        ("Livestock photo of cows", "Livestock photo of cows"),
        ("A photo of a dog.", "A photo of a dog."),
        ("I like example.com", "I like example.com"),
    ],
)
def test_clean_caption(raw, expected):
    assert clean_caption(raw, CFG) == expected


def test_url_and_email_removal_can_be_disabled():
    cfg = CaptionsConfig(remove_urls=False, remove_emails=False)
    text = "see https://example.com/a and bob@example.com"
    assert clean_caption(text, cfg) == text
    assert clean_caption(text, CaptionsConfig(remove_emails=False)) == "see and bob@example.com"
    assert clean_caption(text, CaptionsConfig(remove_urls=False)) == "see https://example.com/a and"


def test_max_chars_cuts_at_a_word_boundary():
    cfg = CaptionsConfig(max_chars=20)
    out = clean_caption("the quick brown fox jumps over the lazy dog", cfg)
    assert out == "the quick brown fox"
    assert clean_caption("the quick brown fox", cfg) == "the quick brown fox"
    # the cut falls exactly after a word
    assert clean_caption("aaaa bbbb cccc dddd eeee", CaptionsConfig(max_chars=19)) == "aaaa bbbb cccc dddd"
    # no spaces (e.g. CJK): hard cut
    assert clean_caption("猫" * 50, cfg) == "猫" * 20
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit"]
    rng = random.Random(0)
    assert clean_caption("A supercalifragilisticexpialidocious day", cfg) == "A"
    for n in (25, 64, 100, 333):
        text = " ".join(rng.choice(words) for _ in range(200))
        out = clean_caption(text, CaptionsConfig(max_chars=n))
        assert len(out) <= n
        assert text.startswith(out) and text[len(out)] == " "  # whole words only
        assert len(out) > n - 12  # and not much shorter than the limit


def test_never_raises_and_stays_fast_on_hostile_input():
    rng = random.Random(0)
    hostile = [
        "word " * 200_000,
        "a" * 1_000_000,
        "a-" * 500_000,
        "<a" * 500_000,
        "<script" * 150_000,
        "a@" * 500_000,
        "&amp;" * 200_000,
        "\ud800" * 1_000_000,
        "http://x/" + "(" * 1_000_000,
        "".join(chr(rng.randrange(1, 0x110000)) for _ in range(200_000)),
        "".join(rng.choice(["<", ">", "&", "amp;", " ", "a", "-", "|", "@", ".", "/", "http://", "www.",
                            "(", ")", "Stock Photo", "\ud800", "Ã", "\x00"]) for _ in range(200_000)),
        b"bytes caption",
        12345,
    ]  # fmt: skip
    t0 = time.perf_counter()
    for text in hostile:
        out = clean_caption(text, CFG)
        assert isinstance(out, str) and len(out) <= CFG.max_chars
        out.encode("utf-8")  # valid UTF-8: storable in Arrow/Parquet
    assert time.perf_counter() - t0 < 5.0


def _table(captions: list[str | None]) -> pa.Table:
    n = len(captions)
    return pa.table(
        {
            "key": [f"{i:012d}" for i in range(n)],
            "url": [f"http://127.0.0.1/{i}.jpg" for i in range(n)],
            "caption": pa.array(captions, pa.string()),
            "image": pa.array([b"\xff\xd8fake" + bytes([i]) for i in range(n)], pa.binary()),
            "width": pa.array([64 + i for i in range(n)], pa.int32()),
            "height": pa.array([48] * n, pa.int32()),
            "language": pa.array(["en"] * n, pa.string()),
            "source": pa.array(["x"] * n, pa.string()),
        }
    )


CAPTIONS = [
    "A red car parked outside",
    "<b>Bold</b> &amp; beautiful",
    "",
    None,
    "<p></p>",
    "   ",
    "Stock Photo - Image 12345",
    "cafÃ© terrace at night",
]


def test_clean_table_accounts_for_every_row():
    table = _table(CAPTIONS)
    kept, rejected = clean_table(table, CFG)
    assert kept.num_rows + rejected.num_rows == table.num_rows
    assert kept.column("caption").to_pylist() == [
        "A red car parked outside",
        "Bold & beautiful",
        "café terrace at night",
    ]
    assert kept.column("caption_raw").to_pylist() == [CAPTIONS[0], CAPTIONS[1], CAPTIONS[7]]
    # same columns, caption_raw right after caption
    assert kept.column_names == ["key", "url", "caption", "caption_raw", "image", "width", "height",
                                 "language", "source"]  # fmt: skip
    assert kept.column("image").to_pylist() == [table.column("image")[i].as_py() for i in (0, 1, 7)]
    assert set(rejected.column("reason").to_pylist()) == {"empty_caption"}
    assert rejected.column("caption_raw").to_pylist() == CAPTIONS[2:7]
    assert rejected.column("detail").to_pylist() == ["caption is blank (0 characters)", "caption is null", "<p></p>",
                                                     "caption is blank (3 characters)",
                                                     "Stock Photo - Image 12345"]  # fmt: skip
    assert "image" not in rejected.column_names


def test_clean_table_min_chars_and_existing_caption_raw():
    table = _table(["ab", "abcdef"]).append_column("caption_raw", pa.array(["orig1", "orig2"]))
    kept, rejected = clean_table(table, CaptionsConfig(min_chars=3))
    assert kept.column("caption").to_pylist() == ["abcdef"]
    assert kept.column("caption_raw").to_pylist() == ["orig2"]  # the original original is kept
    assert rejected.column("detail").to_pylist() == ["ab"]
    empty_kept, empty_rejected = clean_table(_table([]), CFG)
    assert empty_kept.num_rows == 0 and empty_rejected.num_rows == 0
    assert "caption_raw" in empty_kept.column_names


@pytest.mark.parametrize("typ", [pa.large_string(), pa.binary(), pa.null()])
def test_clean_table_other_caption_types(typ):
    values = [None, None] if typ == pa.null() else ["a dog", None]
    col = pa.array([v if typ != pa.binary() or v is None else v.encode() for v in values], typ)
    table = _table(["x", "y"]).set_column(2, "caption", col)
    kept, rejected = clean_table(table, CFG)
    assert kept.num_rows + rejected.num_rows == 2
    assert kept.schema.field("caption_raw").type == pa.string()
    assert kept.column("caption").to_pylist() == [v for v in values if v]


def test_detail_is_truncated():
    _, rejected = clean_table(_table(["<p>" + "x" * 500 + "</p>"]), CaptionsConfig(max_chars=0))
    assert len(rejected.column("detail")[0].as_py()) == 200


def _write_input(dataset: Path, name: str, captions: list[str | None]) -> None:
    """One finished shard of a complete upstream dataset (its fingerprint recorded, its manifest written)."""
    fp = fingerprint.record(dataset, {"step": dataset.name})
    table = _table(captions)
    empty = layout.with_reason(table.select(["key"]).slice(0, 0), [], [])
    layout.write_shard(dataset, name, table, empty, table.num_rows)
    layout.write_manifest(dataset, dataset.name, [], {}, fp)


def test_worker_processes_one_shard(tmp_path):
    src, out = tmp_path / "filter", tmp_path / "captions"
    _write_input(src, "part-00000", CAPTIONS)
    fingerprint.record(out, {"step": "captions"})  # what `captions.run` records before its shards
    worker = CaptionsWorker(str(src), str(out), to_dict(CFG))
    stats = worker.process("part-00000")
    assert stats["rows_in"] == 8 and stats["kept"] == 3 and stats["rejected"] == {"empty_caption": 5}
    assert stats["seconds"] >= 0
    assert layout.done_marker(out, "part-00000").exists()
    kept = pq.read_table(out / "part-00000.parquet")
    assert kept.column("caption_raw").to_pylist() == [CAPTIONS[0], CAPTIONS[1], CAPTIONS[7]]
    rejected = pq.read_table(out / "rejected" / "part-00000.parquet")
    assert rejected.num_rows == 5
    on_disk = json.loads((out / "part-00000.stats.json").read_text())
    assert on_disk["rows_in"] == on_disk["kept"] + sum(on_disk["rejected"].values())
    # a finished shard is skipped through the Ray entry point
    (out / "part-00000.parquet").unlink()
    result = worker(pa.table({"shard": ["part-00000"]}))
    assert json.loads(result["stats"][0])["kept"] == 3
    assert not (out / "part-00000.parquet").exists()


def test_run_on_local_ray(tmp_path, ray_local):
    """The whole step through `run` on the session's embedded local Ray (two shards, two actors)."""
    from pipelines import captions
    from pipelines.config import PrepareConfig

    cfg = PrepareConfig(output_dir=str(tmp_path))
    cfg.captions.num_actors = 2
    _write_input(tmp_path / "download", "part-00000", CAPTIONS)
    _write_input(tmp_path / "download", "part-00001", ["a dog", None, "a cat | Shutterstock"])
    manifest = captions.run(cfg)
    counts = manifest["counts"]
    assert counts == {"shards": 2, "rows_in": 11, "kept": 5, "rejected": {"empty_caption": 6},
                      "rejected_total": 6}  # fmt: skip
    assert manifest["config"]["captions"]["max_chars"] == CFG.max_chars
    kept = pq.read_table(tmp_path / "captions" / "part-00001.parquet")
    assert kept.column("caption").to_pylist() == ["a dog", "a cat"]
    assert kept.column_names == ["key", "caption", "caption_raw"]  # only what the step adds: no image bytes


def test_run_without_download_output_fails_clearly(tmp_path):
    from pipelines import captions
    from pipelines.config import PrepareConfig

    with pytest.raises(FileNotFoundError, match="download"):
        captions.run(PrepareConfig(output_dir=str(tmp_path)))
