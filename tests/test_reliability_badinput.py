"""Reliability: every kind of bad input is rejected with a reason (or kept correctly), nothing crashes,
and nothing but 127.0.0.1 is ever contacted.

The bad-input corpus (`tests/badinput.py`: 100+ kinds) runs through the real download (img2dataset
Ray tasks, one per input shard), captions, filter and teacher (into the training shards) steps on the session's local Ray, served by a
hostile HTTP server on 127.0.0.1 with `download.allow_private: ["127.0.0.1"]`. The download tasks run
under a tripwire: a connection to any non-public address or a lookup of the corpus' host names
raises and is logged, so a guard regression cannot reach the network and is reported.

Prints the summary table (kinds tried, rejected with a reason, kept correctly, crashes) whether or not
pytest captures output.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from breen import shard_format
from breen.settings import ConfigError
from pipelines import download, graph, layout, runner, teacher
from pipelines import filter as filter_step
from pipelines.config import load_config, to_dict
from pipelines.guard import URL_REFUSED_MARK, AddressPolicy, Limits, RefusedURL, install_guarded_opener
from tests.badinput import (
    TINY,
    BadCase,
    Fate,
    HostileServer,
    bad_cases,
    download_shard_under_tripwire,
    encode,
    file_cases,
    picture,
    tripwire,
    write_url_list,
)

pytestmark = pytest.mark.reliability
STEPS = tuple(s.name for s in graph.chain("pretrain"))  # steps that reject rows
CONFIGS = Path(__file__).resolve().parent.parent / "pipelines" / "configs"


def corpus_config(root: Path, urls: Path) -> Path:
    cfg = root / "bad.yaml"
    cfg.write_text(f"""
output_dir: {root / "out"}
input: {{urls: [{urls}]}}
download:
  rows_per_shard: 16
  threads_per_shard: 16
  timeout_s: 4            # per socket operation: cuts the server that never answers
  total_timeout_s: 6      # per download: cuts the servers that trickle bytes
  # (both well above what a healthy local answer takes on a loaded 2-core machine, far below the
  #  minutes that the silent and trickling servers would otherwise hold a download thread)
  max_response_bytes: {TINY}
  allow_private: ["127.0.0.1"]
  cpus_per_shard: 2       # 2 shard tasks at a time on the 4-CPU local Ray: 2 worker processes import
                          # img2dataset (~4 s of CPU each) and take the 7 shards in turn (< 1 s each)
filter: {{min_short_side: 64, max_aspect_ratio: 3, min_words: 3, min_chars: 6, num_actors: 2, cpus_per_actor: 0.5}}
captions: {{num_actors: 1, cpus_per_actor: 0.5}}
teacher: {{model_config: {CONFIGS / "tiny-vit.json"}, random_init_seed: 0, batch_size: 16, cpus_per_actor: 0.5}}
shards: {{rows_per_file: 8}}
""")
    return cfg


def rows_of(dataset: Path, columns: list[str], rejected: bool) -> list[dict]:
    d = dataset / layout.REJECTED if rejected else dataset
    out = []
    for name in layout.finished_shards(dataset):
        f = d / f"{name}.parquet"
        have = pq.read_schema(f).names
        out += pq.read_table(f, columns=[c for c in columns if c in have]).to_pylist()
    return out


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, ray_local):
    """The bad corpus through download (under the tripwire), captions, filter and the teacher."""
    ray = ray_local
    root = tmp_path_factory.mktemp("badinput")
    trip_log = root / "tripwire.log"
    trip_log.touch()
    t0 = time.monotonic()
    crashes: list[str] = []
    with HostileServer() as server:
        cases = bad_cases(server)
        urls = root / "urls.parquet"
        n_rows = write_url_list(cases, urls)
        cfg = load_config(corpus_config(root, urls))
        out = Path(cfg.out.path) / "download"
        output = runner.open_step(cfg, "download", {}, {"urls": [layout.sha256_file(urls)]})
        names = download.make_input_shards(cfg.input.urls, cfg.download.rows_per_shard, out / "_input")
        task = ray.remote(download_shard_under_tripwire).options(
            num_cpus=cfg.download.cpus_per_shard, max_retries=0
        )
        refs = {task.remote(str(trip_log), n, str(out / "_input"), str(out), to_dict(cfg.download),
                            cfg.filter.max_pixels): n for n in names}  # fmt: skip
        for ref, name in refs.items():
            try:
                ray.get(ref)
            except Exception as e:  # a crashed shard: reported, never expected
                crashes.append(f"download {name}: {layout.error_detail(e)}")
        with output:
            runner.finish_step(output, [{"path": str(urls), "sha256": layout.sha256_file(urls)}],
                               {"download": to_dict(cfg.download)})  # fmt: skip
        download_s = time.monotonic() - t0
        for step in graph.chain("pretrain")[1:]:  # captions, filter, teacher into shards
            try:
                graph.runner(step)(cfg)
            except Exception as e:
                crashes.append(f"{step.entry}: {layout.error_detail(e)}")
        requests = server.requests
    return {"cases": cases, "cfg": cfg, "rows": n_rows, "crashes": crashes, "requests": requests,
            "trip_log": trip_log.read_text(), "download_s": download_s, "seconds": time.monotonic() - t0}  # fmt: skip


def fates_by_case(cfg) -> tuple[dict[str, list[Fate]], Counter]:
    """Fate of every input row, grouped by case; and how many times each input key was accounted for."""
    source = [r for f in sorted((Path(cfg.out.path) / "download" / "_input").glob("part-*.arrow"))
              for r in pa.ipc.open_file(f).read_all().select(["key", "case"]).to_pylist()]  # fmt: skip
    seen: Counter = Counter()
    fate: dict[str, Fate] = {}
    for step in STEPS:
        for r in rows_of(Path(cfg.out.path) / step, ["key", "reason", "detail"], rejected=True):
            seen[r["key"]] += 1
            fate[r["key"]] = Fate(step, r["reason"], r["detail"])
    for f in sorted((Path(cfg.out.path) / "shards").glob("part-*.parquet")):
        table = pq.read_table(f, columns=["key", "caption", "width", "height", "image_shard", "image_row"])
        images = shard_format.resolve_images(table, shard_format.images_dir(f))  # stored by download
        for r, image in zip(table.to_pylist(), images, strict=True):
            seen[r["key"]] += 1
            fate[r["key"]] = Fate("kept", None, None, {**r, "image": image})
    by_case: dict[str, list[Fate]] = defaultdict(list)
    for r in source:
        by_case[r["case"]].append(fate.get(r["key"], Fate("lost", None)))
    seen.update({r["key"]: 0 for r in source})
    return by_case, seen


def test_bad_corpus_every_row_accounted_for_and_rejected_with_a_reason(corpus_run, capsys):
    cases: list[BadCase] = corpus_run["cases"]
    cfg = corpus_run["cfg"]
    by_case, seen = fates_by_case(cfg)
    lost = [k for k, n in seen.items() if n == 0]
    duplicated = [k for k, n in seen.items() if n > 1]
    problems = {c.kind: c.verdict(by_case[c.kind]) for c in cases}
    problems = {k: v for k, v in problems.items() if v}

    # The table: kinds of bad input, what happened to them.
    groups: dict[str, Counter] = defaultdict(Counter)
    for c in cases:
        fates = by_case[c.kind]
        ok = c.kind not in problems
        rejected = all(f.step not in ("kept", "lost") for f in fates)
        groups[c.group]["kinds"] += 1
        groups[c.group]["rows"] += len(fates)
        groups[c.group]["rejected_with_reason"] += ok and rejected
        groups[c.group]["kept_correctly"] += ok and not rejected
        groups[c.group]["wrong"] += not ok
    total = sum((g for g in groups.values()), Counter())
    lines = ["", "== reliability: bad inputs (download -> captions -> filter -> teacher into shards) ==",
             f"{'group':<10} {'kinds':>6} {'rows':>5} {'rejected+reason':>16} {'kept correctly':>15} {'wrong':>6}"]  # fmt: skip
    for name, g in [*sorted(groups.items()), ("TOTAL", total)]:
        lines.append(f"{name:<10} {g['kinds']:>6} {g['rows']:>5} {g['rejected_with_reason']:>16} "
                     f"{g['kept_correctly']:>15} {g['wrong']:>6}")  # fmt: skip
    reasons = Counter(f"{f.step}:{f.reason}" for fs in by_case.values() for f in fs)
    lines.append("outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
    lines.append(f"crashes: {len(corpus_run['crashes'])}; rows lost: {len(lost)}, duplicated: {len(duplicated)}; "
                 f"tripwire hits: {len(corpus_run['trip_log'].splitlines())}; "
                 f"download {corpus_run['download_s']:.0f}s, all steps {corpus_run['seconds']:.0f}s")  # fmt: skip
    for kind, why in sorted(problems.items()):
        lines.append(f"WRONG {kind}: {why}")
    with capsys.disabled():
        print("\n".join(lines))

    assert not corpus_run["crashes"], corpus_run["crashes"]
    assert not corpus_run["trip_log"], corpus_run["trip_log"]
    assert corpus_run["rows"] == sum(seen.values()) == len(seen)
    assert not lost and not duplicated, (lost[:5], duplicated[:5])
    assert not problems, problems
    assert total["kinds"] >= 30
    # Per-shard accounting, as every step checks it before writing; training shards hold every kept row.
    for step in STEPS:
        for s in layout.read_stats(Path(cfg.out.path) / step):
            assert s["rows_in"] == s["kept"] + sum(s["rejected"].values()), (step, s)
    kept = sum(f.step == "kept" for fs in by_case.values() for f in fs)
    assert (
        sum(pq.read_metadata(f).num_rows for f in (Path(cfg.out.path) / "shards").glob("part-*.parquet"))
        == kept
    )


def test_time_and_size_caps_bound_every_download(corpus_run):
    """Trickling and silent servers are cut: no download shard takes much longer than the time cap."""
    cfg = corpus_run["cfg"]
    stats = layout.read_stats(Path(cfg.out.path) / "download")
    slowest = max(s["seconds"] for s in stats)
    # total_timeout_s = 6 (timeout_s = 4) per download; without the cap the trickles take minutes
    # (~11 kB at 16 bytes per 0.1 s: ~65 s; the header trickle 300 s). Generous margin: shared machine.
    assert slowest < 6 + 24, stats
    by_case, _ = fates_by_case(cfg)
    for kind in ("server_trickles_body", "server_trickles_headers"):
        assert "took longer than the 6s limit" in by_case[kind][0].detail


def test_refused_urls_never_reach_the_server(corpus_run):
    """Addresses refused at vetting are never connected to; redirects to refused targets stop at the
    redirect (the server sees the first hop only)."""
    requests = corpus_run["requests"]
    assert not any("127.0.0.2" in r for r in requests)
    for name in ("private", "metadata", "metaname", "lo2", "file", "ftp"):
        assert requests.count(f"/redirect/{name}") == 1, name
    by_case, _ = fates_by_case(corpus_run["cfg"])
    for kind in ("redirect_to_private", "redirect_to_metadata", "redirect_to_metadata_name"):
        assert by_case[kind][0].detail.startswith(URL_REFUSED_MARK), by_case[kind]


# ----------------------------------------------------------------------------- guard units (no Ray)


@pytest.fixture
def server():
    with HostileServer() as s:
        yield s


@pytest.fixture
def opener():
    def install(max_seconds: float = 30.0, max_bytes: int = TINY, allow=("127.0.0.1",)):
        install_guarded_opener(AddressPolicy(list(allow)), Limits(max_bytes, max_seconds))

    yield install
    urllib.request.install_opener(None)


@pytest.mark.parametrize("path", ["trickle/ok.jpg", "trickle-headers/"])
def test_total_time_cap_cuts_a_trickling_server(server, opener, path):
    server.add("ok.jpg", encode(picture(1), "JPEG"))
    opener(max_seconds=1.0)
    t0 = time.monotonic()
    with pytest.raises(RefusedURL, match="took longer than the 1s limit"):
        urllib.request.urlopen(server.url(path), timeout=10).read()
    # Cut by the 1 s cap: the per-socket timeout (10 s) never fires (bytes keep coming) and the trickle
    # lasts ~40 s (body) or 300 s (headers); the margin is for a loaded machine.
    assert time.monotonic() - t0 < 5


def test_time_cap_spans_redirect_hops(server, opener):
    """One deadline per download, not per hop: a redirect does not restart the clock."""
    server.add("ok.jpg", encode(picture(1), "JPEG"))
    target = server.redirect("slow", server.url("trickle/ok.jpg"))
    hop = server.redirect("hop", target)
    opener(max_seconds=1.0)
    t0 = time.monotonic()
    with pytest.raises(RefusedURL, match="took longer"):
        urllib.request.urlopen(hop, timeout=10).read()
    assert time.monotonic() - t0 < 5


def test_a_server_that_never_answers_is_cut_by_the_timeout(server, opener):
    opener(max_seconds=30.0)
    t0 = time.monotonic()
    with pytest.raises((TimeoutError, urllib.error.URLError, RefusedURL)):
        urllib.request.urlopen(server.url("hang/"), timeout=1).read()
    assert time.monotonic() - t0 < 5  # the server would stay silent for 120 s


@pytest.mark.parametrize("target", ["http://10.0.0.1/x.jpg", "http://169.254.169.254/latest/meta-data/",
                                    "http://metadata.google.internal/v1/", "http://[fd00:ec2::254]/",
                                    "http://0xa9.0xfe.0xa9.0xfe/"])  # fmt: skip
def test_redirect_to_a_refused_address_is_stopped_before_connecting(server, opener, tmp_path, target):
    log = tmp_path / "trip.log"
    opener()
    with tripwire(log), pytest.raises(RefusedURL) as e:
        urllib.request.urlopen(server.redirect("x", target), timeout=5).read()
    assert str(e.value).startswith(URL_REFUSED_MARK + "redirect to")
    assert not log.exists() or not log.read_text()  # no connection (or lookup) was even attempted


def test_tripwire_blocks_before_any_packet(tmp_path):
    """The safety net itself: connecting to a private address raises before the connect call."""
    import socket

    log = tmp_path / "trip.log"
    with tripwire(log), pytest.raises(PermissionError, match="tripwire"):
        socket.create_connection(("10.0.0.1", 80), timeout=0.01)
    assert "10.0.0.1" in log.read_text()


def test_guard_checks_the_connected_peer_not_only_the_url(server, opener):
    """Connection-time check (what stops DNS rebinding): with nothing allowed, a URL that was never
    vetted still cannot reach 127.0.0.1, and the refusal is marked as such. The connection resolves
    the host itself and connects only to an address it checked: not even a TCP connection is made."""
    server.add("ok.jpg", encode(picture(1), "JPEG"))
    opener(allow=())
    with pytest.raises(RefusedURL, match=r"connection to '127\.0\.0\.1'.*not public") as e:
        urllib.request.urlopen(server.url("f/ok.jpg"), timeout=5).read()
    assert str(e.value).startswith(URL_REFUSED_MARK)
    assert server.requests == [] and server.connections == 0
    opener(allow=("127.0.0.1",))  # control: allowed, the same URL connects and downloads
    assert urllib.request.urlopen(server.url("f/ok.jpg"), timeout=5).read() == encode(picture(1), "JPEG")
    assert server.connections == 1


# ----------------------------------------------------------------------------- file-level input errors


def _cfg(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(f"output_dir: {tmp_path / 'out'}\nteacher: {{random_init_seed: 0}}\n" + body)
    return p


def test_url_list_problems_fail_fast_naming_the_file_and_field(tmp_path, capsys):
    """Each bad URL-list file stops the download step (exit 2) before any work, naming file and field."""
    cases = file_cases(tmp_path / "lists")
    for kind, path, needle in cases:
        cfg = _cfg(tmp_path, f"input: {{urls: [{path}]}}\n")
        assert download.main(["--config", str(cfg)]) == 2, kind
        err = capsys.readouterr().err
        assert path.name in err and needle in err, (kind, err)
        assert "Traceback" not in err
        assert not (tmp_path / "out" / "download" / "_input" / "_SUCCESS.json").exists(), kind
    assert len(cases) >= 8


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("download: {timeout_s: 0}\n", "download.timeout_s: must be > 0"),
        ("download: {total_timeout_s: -1}\n", "download.total_timeout_s: must be > 0"),
        ("download: {max_response_bytes: 0}\n", "download.max_response_bytes: must be > 0"),
        ("download: {threads_per_shard: 0}\n", "download.threads_per_shard: must be > 0"),
        ("download: {allow_private: 127.0.0.1}\n", "download.allow_private: expected a list"),
        ("download: {timeout: 3}\n", "download.timeout: unknown key"),
        ("input: {urls: [missing.csv]}\n", "input.urls[0]: file not found"),
    ],
)
def test_config_errors_name_the_field(tmp_path, body, needle):
    with pytest.raises(ConfigError) as e:
        load_config(_cfg(tmp_path, body))
    assert needle in str(e.value) and "cfg.yaml" in str(e.value)


def test_invalid_utf8_in_csv_captions_marks_the_row_not_the_file(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_bytes(
        b"url,caption,src\nhttp://127.0.0.1/a.jpg,caf\xe9 \xff on a table,x\xfe\nhttp://127.0.0.1/b.jpg,ok,y\n"
    )
    t, problems = download.read_url_list_rows(path)
    assert t.schema.field("caption").type == pa.string() and t.column_names == ["url", "caption", "src"]
    # the values are escaped (the rejected row shows them), the row marked
    assert t.column("caption").to_pylist() == ["caf\\xe9 \\xff on a table", "ok"]
    assert t.column("src").to_pylist() == ["x\\xfe", "y"]
    assert problems == ["invalid UTF-8 in column 'caption' (byte 0xe9 at offset 3)", None]
    assert download.read_url_list(path).equals(t)


def test_a_step_without_its_input_fails_fast(tmp_path, capsys):
    cfg = _cfg(tmp_path, "")
    assert filter_step.main(["--config", str(cfg)]) == 2
    assert "no finished shards" in capsys.readouterr().err


# ----------------------------------------------------------------------------- weights


def test_weights_load_only_through_safetensors_or_weights_only():
    """No code path unpickles: every torch.load passes weights_only=True; no pickle/np allow_pickle; a
    DeepSpeed checkpoint (whose own loader unpickles with weights_only=False) is loaded only by
    `jobs.checkpoint.restore_checkpoint`, inside `weights_only_loads` (tests/test_reliability_checkpoint.py
    checks that path on a real ZeRO-3 checkpoint and on a poisoned one)."""
    import ast
    import re

    root = Path(__file__).resolve().parent.parent
    offenders = []
    guarded_loads = 0
    for folder in ("pipelines", "breen", "jobs", "bench"):
        for f in sorted((root / folder).rglob("*.py")):
            text = f.read_text()
            name = str(f.relative_to(root))
            for m in re.finditer(r"torch\.load\(", text):
                call = text[m.start() : text.find(")", m.start()) + 200]
                if "weights_only=True" not in call.split("\n\n")[0]:
                    offenders.append(f"{name}: torch.load without weights_only=True")
            # Allowlists are scoped (`with torch.serialization.safe_globals(...)`), never process-wide.
            for bad in (r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True", r"\bdill\.", r"\bjoblib\.load",
                        r"weights_only\s*=\s*False", r"torch\.jit\.load\(", r"use_safetensors\s*=\s*False",
                        r"add_safe_globals\("):  # fmt: skip
                if re.search(bad, text):
                    offenders.append(f"{name}: {bad}")
            # engine.load_checkpoint(...) only inside `with weights_only_loads(engine, ...):` in jobs/checkpoint.py
            guarded: set[int] = set()
            tree = ast.parse(text)
            for node in ast.walk(tree):
                if isinstance(node, ast.With) and any(
                    isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", "") == "weights_only_loads"
                    for i in node.items
                ):  # fmt: skip
                    guarded |= {id(n) for n in ast.walk(node)}
            for node in ast.walk(tree):
                is_load = isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load_checkpoint"
                if is_load and (name != "jobs/checkpoint.py" or id(node) not in guarded):
                    offenders.append(f"{name}:{node.lineno}: load_checkpoint outside weights_only_loads")
                elif is_load:
                    guarded_loads += 1
    assert not offenders, offenders
    # The guarded DeepSpeed load exists (the AST check above is not vacuous).
    assert guarded_loads >= 1, "no engine.load_checkpoint inside `with weights_only_loads(...)` in jobs/checkpoint.py"


def test_a_pickled_teacher_checkpoint_is_refused_without_running_code(tmp_path, capsys):
    """A malicious .bin (pickle with a payload) fails fast, naming the file; the payload never runs."""
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps({"state_dict": Payload()}, protocol=2))  # torch.save's protocol
    cfg = _cfg(tmp_path, "")
    cfg.write_text(cfg.read_text().replace("random_init_seed: 0",
                                           f"weights: {evil}, model_config: {CONFIGS / 'tiny-vit.json'}"))  # fmt: skip
    (tmp_path / "out" / "filter").mkdir(parents=True)
    (tmp_path / "out" / "filter" / "part-00000.done").touch()  # upstream present: reach the model load

    assert teacher.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "teacher.weights" in err and "evil.bin" in err, err
    assert not marker.exists()


def test_download_failure_reasons():
    """A refusal inside the download (redirect, connection) is `url_refused`; anything else an error."""
    assert download._failure_reason("failed_to_download", URL_REFUSED_MARK + "redirect to x") == "url_refused"
    assert download._failure_reason("failed_to_download", "HTTP Error 500") == "download_error"
    assert download._failure_reason("failed_to_resize", "Image decoding error") == "decode_error"


# ----------------------------------------------------------------------------- bad records


def _rows(dataset: Path, rejected: bool) -> list[dict]:
    """Every row of the finished shards of a dataset (or of its rejected rows)."""
    d = dataset / layout.REJECTED if rejected else dataset
    return [r for n in layout.finished_shards(dataset) for r in pq.read_table(d / f"{n}.parquet").to_pylist()]


def test_bad_sft_records_are_rejected_with_a_reason_and_the_job_stays_green(tmp_path, ray_local, capsys):
    """One SFT JSON with lone surrogates (value, image path, id, key), invalid UTF-8, a record nested
    100,000 levels deep and a broken record, beside good ones; and a teacher whose float16 targets
    overflow on some images. `python -m pipelines.sft_import` (the import, then the teacher into
    `sft_shards/`) exits 0; every record is kept or rejected once, with the expected reason and detail;
    no target with a nan or inf is written."""
    from pipelines import sft_import
    from tests.badinput import fp16_overflow_teacher, sft_bad_corpus

    t0 = time.monotonic()
    sft_json, folder, expect = sft_bad_corpus(tmp_path)
    weights = fp16_overflow_teacher(tmp_path / "overflow.safetensors", CONFIGS / "tiny-vit.json", folder,
                                    small=["grey.png", "noise.png"], large=["pic1.png", "pic2.png"])  # fmt: skip
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"""
output_dir: {tmp_path / "out"}
input: {{sft: {{json: {sft_json}, image_folder: {folder}}}}}
download: {{rows_per_shard: 4}}
teacher: {{weights: {weights}, model_config: {CONFIGS / "tiny-vit.json"}, batch_size: 4, cpus_per_actor: 0.5}}
shards: {{rows_per_file: 4}}
""")
    assert sft_import.main(["--config", str(cfg)]) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    fate: dict[str, tuple[str, str | None, str | None]] = {}
    seen: Counter = Counter()
    for step in ("sft_import", "sft_shards"):
        for r in _rows(out / step, rejected=True):
            fate[r["key"]] = (step, r["reason"], r["detail"])
            seen[r["key"]] += 1
        for s in layout.read_stats(out / step):
            assert s["rows_in"] == s["kept"] + sum(s["rejected"].values()), (step, s)
    shards = _rows(out / "sft_shards", rejected=False)
    for r in shards:
        fate[r["key"]] = ("kept", None, None)
        seen[r["key"]] += 1
    keys = [f"sft{i:09d}" for i in range(len(expect))]
    assert set(seen) == set(keys) and set(seen.values()) == {1}  # each record accounted for exactly once
    wrong = []
    for key, (step, reason, detail) in zip(keys, expect, strict=True):
        got = fate[key]
        if got[:2] != (step, reason) or (detail and not re.search(detail, got[2] or "")):
            wrong.append(f"{key}: got {got}, expected {(step, reason, detail)}")
    assert not wrong, wrong

    # What was kept is clean: finite float16 targets (null for the text-only story), real emoji text.
    for r in shards:
        for col in ("fine", "coarse"):
            assert r[col] is None or np.isfinite(np.asarray(r[col], np.float32)).all(), r["key"]
    assert sum(r["fine"] is None for r in shards) == 1
    assert any("\U0001f600" in r["conversations"] for r in shards)
    # Rejected rows stay readable: escaped id, the record's start.
    rejected = {r["key"]: r for r in _rows(out / "sft_import", rejected=True)}
    assert rejected[keys[10]]["id"] == "sur-id-\\udbff" and rejected[keys[13]]["record"].startswith(
        '{"id": "deep"'
    )
    import_stats = layout.read_stats(out / "sft_import")
    totals = sum((Counter(s["rejected"]) for s in import_stats), Counter())
    assert totals == {"invalid_unicode": 5, "invalid_record": 2}
    shard_totals = sum((Counter(s["rejected"]) for s in layout.read_stats(out / "sft_shards")), Counter())
    assert shard_totals == {"teacher_non_finite": 2}
    with capsys.disabled():
        print(f"\n== bad SFT records: {len(expect)} records, import rejected {dict(totals)}, sft_shards rejected "
              f"{dict(shard_totals)}, {len(shards)} kept; {time.monotonic() - t0:.0f}s ==")  # fmt: skip


def test_url_lists_with_invalid_unicode_reject_rows_not_the_file(tmp_path, ray_local):
    """JSONL, CSV, TSV and Parquet URL lists with lone surrogates or invalid UTF-8 in the url, the caption
    or an extra column: the download step (real img2dataset, 127.0.0.1) exits 0, rejects exactly those
    rows as `invalid_unicode` naming the column, keeps their values escaped, downloads the good rows."""
    from tests.badinput import url_list_bad_text

    with HostileServer() as server:
        url = server.add("ok.jpg", encode(picture(5), "JPEG"))
        lists = url_list_bad_text(tmp_path / "lists", url)
        cfg = _cfg(
            tmp_path,
            f"""input: {{urls: [{", ".join(str(p) for p, _ in lists.values())}]}}
download: {{rows_per_shard: 4, threads_per_shard: 4, allow_private: ["127.0.0.1"], cpus_per_shard: 1}}
""",
        )
        assert download.main(["--config", str(cfg)]) == 0
    expect = [e for _, rows in lists.values() for e in rows]
    out = tmp_path / "out" / "download"
    rejected = {r["key"]: r for r in _rows(out, rejected=True)}
    kept = {r["key"]: r for r in _rows(out, rejected=False)}
    assert len(rejected) + len(kept) == len(expect) == 6 + 3 * 5
    for i, (reason, detail) in enumerate(expect):
        key = f"{i:012d}"
        if reason is None:
            assert key in kept and kept[key]["image"], key
        else:
            assert rejected[key]["reason"] == reason and re.search(detail, rejected[key]["detail"]), rejected[
                key
            ]
    values = {(r["caption"], r["src"]) for r in rejected.values()}
    assert ("A cat \\udc00 on a mat", "c") in values and ("A cat \\xed\\xa0\\x80 on a mat", "c") in values
    stats = layout.read_stats(out)
    assert sum(s["rejected"].get("invalid_unicode", 0) for s in stats) == 4 + 3 * 3
    assert all(s["rows_in"] == s["kept"] + sum(s["rejected"].values()) for s in stats)


def test_a_jsonl_line_nested_absurdly_deep_fails_fast_naming_the_line(tmp_path):
    """pyarrow's JSON reader crashes the process (SIGSEGV) on a line nested ~10,000 levels deep: the
    download step measures every line first and stops with a message naming it (in a subprocess here, so
    a regression cannot take the test run down)."""
    import subprocess
    import sys

    deep = "[" * 100_000 + "]" * 100_000
    for name, lines, needle in [
        ("later.jsonl", ['{"url": "http://127.0.0.1/a.jpg", "caption": "a cat"}',
                         '{"url": "http://127.0.0.1/b.jpg", "caption": "c", "x": ' + deep + "}"], "line 2: nested deeper"),
        ("first.jsonl", ['{"url": "u", "caption": "c", "x": ' + deep + "}"], "first JSON line is nested deeper"),
    ]:  # fmt: skip
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(f"output_dir: {tmp_path / 'out'}\ninput: {{urls: [{tmp_path / name}]}}\n"
                       "teacher: {random_init_seed: 0}\n")  # fmt: skip
        run = subprocess.run([sys.executable, "-m", "pipelines.download", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
        assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
        assert name in run.stderr and needle in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_non_finite_targets_are_counted_as_bad_target_at_ingest(tmp_path):
    """A nan or inf in a training shard's fine/coarse (a shard written before the teacher checked them)
    is a rejected row `bad_target` at read time, counted by the worker under that reason, never a
    sample whose loss is nan."""
    from jobs import ingest
    from tests._tiny_models import png_bytes, tiny_config, tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path)
    config = tiny_config()
    fine = np.zeros((4, 64, config.clip_dim), np.float16)
    coarse = np.zeros((4, 36, config.clip_dim), np.float16)
    fine[1, 3, 5], coarse[2, 0, 0] = np.nan, np.inf
    rows = pa.table({"key": ["a", "b", "c", "d"], "caption": ["A cat on a mat."] * 4,
                     shard_format.FINE: shard_format.tensor_array(fine),
                     shard_format.COARSE: shard_format.tensor_array(coarse)})  # fmt: skip
    enc = ingest.ReadEncode(str(tmp_path), config.to_dict(), "caption", 512, seed=0)
    out = enc.encode_rows(rows, 0, [png_bytes(64, 64)] * 4)
    assert out["ok"].tolist() == [True, False, False, True]
    assert out["reason"].tolist() == ["", "bad_target", "bad_target", ""]
    batch = ingest.Collate(config)(out)
    code = ingest.REJECT_REASONS.index("bad_target")
    assert batch["reject"].tolist() == [-1, code, code, -1]  # what the worker sums per reason
    assert batch["align_mask"].tolist() == [True, True] and batch["fine"].float().isfinite().all()
