"""Capacity planner: wall time, GPU-hours, CPU-hours and storage of a BREEN run on a cluster.

Run:  python -m jobs.plan --pairs 13e6 --gpus 64 --gpu-type h100
      python -m jobs.plan --pairs 13e6 --gpus 64 --gpu-type h100 --image-tokens 1728 --out runs/plan

Prints one line per phase (download, filter, teacher, sft_teacher, convert, stage1, stage2, stage3) with its wall time,
GPU-hours, CPU-hours and the storage it adds, then every assumption the numbers rest on, and writes
a PNG chart of the timeline (`<out>/timeline.png`) and the plan as JSON (`<out>/plan.json`).

The model behind the numbers (all of it in the functions below, each returning plain numbers):

- `--pairs` is the number of image-text pairs that reach training (the paper's 13M). The download
  step fetches pairs / (download_ok * filter_keep) URLs; the filter step reads the downloaded images.
- CPU steps (download, filter) run at a per-core rate on `--cpu-cores` cores:
  wall = rows / (rate * cores). Download is also bounded by the cluster's ingress bandwidth.
- GPU compute comes from FLOP counts: teacher = images * 382 GFLOP (CLIP ViT-L/14-336 forward at
  336 px); training = samples * tokens_per_sample * `BreenConfig.flops_per_token(tokens_per_sample)`
  (6 * active matmul parameters + attention, the model-FLOPs convention of MFU). GPU-seconds =
  FLOPs / (peak * MFU), wall = GPU-seconds / GPUs, so doubling the GPUs halves the wall time.
- The teacher and training also need CPUs to decode (and tokenise) samples, on the GPU nodes: a
  GPU phase takes the longer of its GPU time and samples / (ingest rate * CPUs on the GPU nodes).
- GPU-hours and CPU-hours are *allocated* hours (devices reserved x wall time); CPU-hours of a GPU
  phase are the CPUs of its GPU nodes.
- With `--storage bucket` (datasets and checkpoints in an object store instead of a shared volume) every
  phase is also bounded by the bytes it moves to and from the bucket over its nodes' bandwidth:
  wall >= bytes / (nodes * `--bucket-gbps-per-node`). Request costs are negligible (a shard is one
  object of megabytes, a few PUTs and GETs per shard); per-node bandwidth and egress are what bound it.
  Training checkpoints are uploaded asynchronously; the plan states each upload's time.
- Storage is what each phase writes to the shared volume or bucket: image bytes once (download; the training
  shards reference them), a few hundred bytes of text and decisions per row in the other data steps,
  100 x 1024 float16 features per training row; training adds the last K
  ZeRO-3 checkpoints (bf16 weights + fp32 master weights and Adam moments of trainable parameters)
  and the consolidated bf16 weights.

Per-core CPU rates come from `bench/rates.json` when it exists (written by `python -m bench.run_all`; each key
missing from it falls back to the default below, and the output says which is which). Schema:

    {
      "download_images_per_s_per_core": 50.0,       # download step, images written per second per core
      "filter_rows_per_s_per_core": 100.0,          # filter step (decode check, phash, language)
      "teacher_images_per_s_per_core_cpu": 0.1,     # CLIP ViT-L/14-336 fp32 on CPU (for comparison)
      "ingest_samples_per_s_per_core": 50.0,        # training ingest: decode + tokenise + collate
      "_source": "free text: machine, date, commit"  # optional; keys starting with "_" are notes
    }

Values must be positive numbers; unknown keys are an error (so a typo cannot silently fall back).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from breen.stages import STAGES

# --------------------------------------------------------------------------------------- constants
CLIP_L14_336_FLOPS_PER_IMAGE = 382e9  # forward pass at 336 px (2 FLOPs per multiply-add)
FEATURE_BYTES_PER_IMAGE = (64 + 36) * 1024 * 2  # fine [64, 1024] + coarse [36, 1024] float16
ROW_METADATA_BYTES = 400  # per row: key, cleaned + raw caption, language, phash, image reference (Parquet)
N_QUERIES = 100  # 8x8 fine + 6x6 coarse learnable queries per image

# Dense bf16 tensor-core peak per GPU, FLOP/s (no structured sparsity).
GPU_PEAK_FLOPS: dict[str, float] = {
    "a100": 312e12,
    "h100": 989e12,  # SXM
    "h200": 989e12,
    "b200": 2250e12,
    "l40s": 362e12,
}

DEFAULT_RATES: dict[str, float] = {
    "download_images_per_s_per_core": 50.0,
    "filter_rows_per_s_per_core": 100.0,
    "captions_rows_per_s_per_core": 500.0,
    "teacher_images_per_s_per_core_cpu": 0.1,
    "ingest_samples_per_s_per_core": 50.0,
}
RATE_NOTES: dict[str, str] = {
    "download_images_per_s_per_core": "assumed: img2dataset-style fetch + resize + encode on a well-connected node",
    "filter_rows_per_s_per_core": "assumed: header check, decode, perceptual hash, language id per row",
    "captions_rows_per_s_per_core": "assumed: caption cleaning (HTML, ftfy, URLs, boilerplate), text only",
    "teacher_images_per_s_per_core_cpu": "RECIPES.md: ViT-L/14-336 fp32 takes about 5 s per image on 2 cores",
    "ingest_samples_per_s_per_core": "assumed: JPEG decode (<= 672 px) + letterbox + tokenise + collate",
}
DEFAULT_RATES_FILE = Path(__file__).resolve().parent.parent / "bench" / "rates.json"

PHASES = ("download", "filter", "teacher", "sft_teacher", "convert", *STAGES)

# Where the defaults that are not measured here come from.
SOURCES: dict[str, str] = {
    "download_ok": "img2dataset reports 77-81% of URLs downloaded and decoded on real URL lists; set "
    "--download-ok for yours",
    "sft_samples": "BREEN's SFT set is 4M samples (comparison table in the README of EvolvingLMMs-Lab/NEO: "
    "BREEN 13M pre-training / 4M SFT)",
    "keep_checkpoints": "checkpoint.keep_last of the stage configs, jobs/configs/",
    "convert_gbps": "assumed: one pod reading and writing the shared volume",
    "bucket_gbps_per_node": "assumed: pyarrow's S3/GCS client with parallel range reads and multipart uploads "
    "sustains several Gbit/s per node on a 25-100 Gbit/s NIC in the bucket's region; measure yours (the "
    "cloud's per-instance limit, or an S3-compatible store's disks and network)",
}


def training_keep_last() -> int:
    """Checkpoints the training keeps per stage: the largest ``checkpoint.keep_last`` of the three stage
    configs at cluster scale (`jobs/configs/`)."""
    from jobs.config import build_config

    return max(build_config(stage).checkpoint.keep_last for stage in STAGES)


# --------------------------------------------------------------------------------------- inputs
@dataclass
class Assumptions:
    """Every input of the plan; `describe()` prints them all."""

    pairs: float = 13e6
    gpus: int = 64  # GPUs for the teacher and stages 1-2
    stage3_gpus: int | None = None  # None: half of `gpus` (64 -> 32 in the released scripts)
    gpu_type: str = "h100"
    gpu_peak_flops: float | None = None  # None: GPU_PEAK_FLOPS[gpu_type]
    mfu: float = 0.35  # training model-FLOPs utilisation
    teacher_mfu: float = 0.40  # CLIP forward in bf16 (large batches, no backward)
    cpu_cores: int = 256  # CPU worker cores for download/filter (full overlay: 8 pods x 32 CPUs)
    cpus_per_gpu: int = 12  # CPUs per GPU on the GPU nodes (full overlay: 96 CPUs per 8-GPU pod)
    ingress_gbps: float = 25.0  # cluster download bandwidth from the internet, Gbit/s
    download_ok: float = 0.80  # fraction of URLs that download and decode (SOURCES["download_ok"])
    filter_keep: float = 0.90  # fraction of downloaded images the filter keeps
    source_image_kb: float = 250.0  # mean size of a source image as served (network transfer)
    image_kb: float = 120.0  # mean stored image (long side <= 672, JPEG q95)
    stage1_fraction: float = 4 / 13  # stage 1 trains on 4M of the 13M pairs, stage 2 on the other 9M
    sft_samples: float = 4e6  # stage-3 SFT samples (SOURCES["sft_samples"])
    image_tokens: int = 2304  # per image: 48x48 for a square image (the maximum); 4:3 gives 1728
    caption_tokens: int = 64  # stages 1-2 text tokens per sample
    sft_text_tokens: int = 400  # stage-3 text tokens per sample (question, repeated question, answer)
    sft_sample_kb: float = 130.0  # stored SFT row (image + conversation) before features
    keep_checkpoints: int | None = None  # ZeRO-3 checkpoints kept per stage; None: the training config's
    convert_gbps: float = 0.5  # GB/s the conversion reads and writes on the shared volume (assumed)
    storage: str = "volume"  # "volume" (a shared ReadWriteMany volume) or "bucket" (an object store)
    bucket_gbps_per_node: float = 10.0  # Gbit/s each node reads and writes the bucket at (SOURCES)
    gpus_per_node: int = 8  # full overlay: 8 GPUs per GPU node
    cpu_cores_per_node: int = 32  # full overlay: 32 CPUs per CPU pod
    preset: str = "qwen2.5-7b"
    rates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RATES))
    rate_sources: dict[str, str] = field(default_factory=dict)

    @property
    def peak(self) -> float:
        if self.gpu_peak_flops is not None:
            return self.gpu_peak_flops
        if self.gpu_type not in GPU_PEAK_FLOPS:
            raise ValueError(f"--gpu-type: unknown {self.gpu_type!r}; choose from {sorted(GPU_PEAK_FLOPS)} "
                             f"or give --gpu-peak-tflops")  # fmt: skip
        return GPU_PEAK_FLOPS[self.gpu_type]

    @property
    def checkpoints(self) -> int:
        return self.keep_checkpoints if self.keep_checkpoints is not None else training_keep_last()

    @property
    def gpus_stage3(self) -> int:
        return self.stage3_gpus if self.stage3_gpus is not None else max(1, self.gpus // 2)

    @property
    def urls(self) -> float:
        return self.pairs / (self.download_ok * self.filter_keep)

    @property
    def downloaded(self) -> float:
        return self.urls * self.download_ok

    def stage_gpus(self, stage: str) -> int:
        return self.gpus_stage3 if stage == "stage3" else self.gpus

    def stage_samples(self, stage: str) -> float:
        if stage == "stage1":
            return self.pairs * self.stage1_fraction
        if stage == "stage2":
            return self.pairs * (1.0 - self.stage1_fraction)
        return self.sft_samples

    def tokens_per_sample(self, stage: str) -> int:
        text = self.sft_text_tokens if stage == "stage3" else self.caption_tokens
        return self.image_tokens + N_QUERIES + text

    def validate(self) -> None:
        checks = {
            "pairs": self.pairs > 0, "gpus": self.gpus > 0, "mfu": 0 < self.mfu <= 1,
            "teacher_mfu": 0 < self.teacher_mfu <= 1, "cpu_cores": self.cpu_cores > 0,
            "cpus_per_gpu": self.cpus_per_gpu > 0, "ingress_gbps": self.ingress_gbps > 0,
            "download_ok": 0 < self.download_ok <= 1, "filter_keep": 0 < self.filter_keep <= 1,
            "stage1_fraction": 0 <= self.stage1_fraction <= 1, "sft_samples": self.sft_samples >= 0,
            "image_tokens": self.image_tokens >= 0, "keep_checkpoints": self.checkpoints >= 1,
            "convert_gbps": self.convert_gbps > 0, "storage": self.storage in ("volume", "bucket"),
            "bucket_gbps_per_node": self.bucket_gbps_per_node > 0, "gpus_per_node": self.gpus_per_node > 0,
            "cpu_cores_per_node": self.cpu_cores_per_node > 0,
            "stage3_gpus": self.stage3_gpus is None or self.stage3_gpus > 0,
        }  # fmt: skip
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"out-of-range assumption(s): {', '.join(bad)}")
        self.peak  # noqa: B018 (raises on an unknown GPU type)


def load_rates(path: Path | None) -> tuple[dict[str, float], dict[str, str]]:
    """Per-core rates: `path` (JSON, see the module docstring) over the defaults; and each rate's source."""
    rates = dict(DEFAULT_RATES)
    sources = {k: f"default ({RATE_NOTES[k]})" for k in rates}
    if path is None or not path.exists():
        return rates, sources
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of rates")
    note = data.get("_source")
    for key, value in data.items():
        if key.startswith("_"):
            continue
        if key not in DEFAULT_RATES:
            raise ValueError(f"{path}: unknown rate {key!r} (known: {', '.join(sorted(DEFAULT_RATES))})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{path}: {key} must be a positive number, got {value!r}")
        rates[key] = float(value)
        sources[key] = f"measured ({path.name}{': ' + str(note) if note else ''})"
    return rates, sources


# --------------------------------------------------------------------------------------- the math
@dataclass
class Phase:
    name: str
    what: str
    wall_s: float
    gpus: int
    gpu_hours: float
    cpu_hours: float
    storage_bytes: float
    bound: str  # what limits the wall time
    notes: list[str] = field(default_factory=list)


def download_phase(a: Assumptions) -> Phase:
    rate = a.rates["download_images_per_s_per_core"]
    cpu_wall = a.downloaded / (rate * a.cpu_cores)
    net_wall = a.downloaded * a.source_image_kb * 1e3 * 8 / (a.ingress_gbps * 1e9)
    wall = max(cpu_wall, net_wall)
    return Phase(
        "download", f"{_n(a.urls)} URLs -> {_n(a.downloaded)} images", wall, 0, 0.0,
        a.cpu_cores * wall / 3600, a.downloaded * a.image_kb * 1e3,
        "CPU" if cpu_wall >= net_wall else "network",
        [f"CPU-bound time {_t(cpu_wall)}, bandwidth-bound time {_t(net_wall)}"],
    )  # fmt: skip


def filter_phase(a: Assumptions) -> Phase:
    """Captions (text only, every downloaded row) then the filter (image checks, language, dedup)."""
    captions_wall = a.downloaded / (a.rates["captions_rows_per_s_per_core"] * a.cpu_cores)
    filter_wall = a.downloaded / (a.rates["filter_rows_per_s_per_core"] * a.cpu_cores)
    wall = captions_wall + filter_wall
    # captions/ and filter/ write only what they add or decide, no image bytes.
    storage = a.downloaded * ROW_METADATA_BYTES
    return Phase("filter", f"{_n(a.downloaded)} rows -> {_n(a.pairs)} kept (captions, then filter)", wall, 0, 0.0,
                 a.cpu_cores * wall / 3600, storage, "CPU",
                 [f"captions {_t(captions_wall)}, filter {_t(filter_wall)}"])  # fmt: skip


def teacher_gpu_seconds(a: Assumptions) -> float:
    """GPU-seconds of the CLIP teacher: images * 382 GFLOP / (peak * teacher MFU)."""
    return a.pairs * CLIP_L14_336_FLOPS_PER_IMAGE / (a.peak * a.teacher_mfu)


def teacher_phase(a: Assumptions) -> Phase:
    gpu_s = teacher_gpu_seconds(a)
    gpu_wall = gpu_s / a.gpus
    # Decoding and letterboxing run on the GPU nodes' CPUs, at about the training-ingest rate.
    decode_wall = a.pairs / (a.rates["ingest_samples_per_s_per_core"] * a.gpus * a.cpus_per_gpu)
    wall = max(gpu_wall, decode_wall)
    # The training shards hold the features, the text and a reference to the image bytes in download/.
    storage = a.pairs * (FEATURE_BYTES_PER_IMAGE + ROW_METADATA_BYTES)
    cpu_alt = a.pairs / a.rates["teacher_images_per_s_per_core_cpu"] / 3600
    notes = [f"GPU-bound time {_t(gpu_wall)}, CPU decode-bound time {_t(decode_wall)}",
             f"on CPUs instead the CLIP forward would take {cpu_alt:,.0f} core-hours"]  # fmt: skip
    return Phase("teacher", f"{_n(a.pairs)} images x 382 GFLOP (+ shards)", wall, a.gpus, a.gpus * wall / 3600,
                 a.gpus * a.cpus_per_gpu * wall / 3600, storage, "GPU" if gpu_wall >= decode_wall else "CPU decode",
                 notes)  # fmt: skip


def sft_teacher_phase(a: Assumptions) -> Phase:
    """sft_import + the teacher pass over the SFT images into sft_shards/ (every sample counted with one
    image: an upper bound, text-only samples need no features)."""
    gpu_wall = a.sft_samples * CLIP_L14_336_FLOPS_PER_IMAGE / (a.peak * a.teacher_mfu) / a.gpus
    decode_wall = a.sft_samples / (a.rates["ingest_samples_per_s_per_core"] * a.gpus * a.cpus_per_gpu)
    wall = max(gpu_wall, decode_wall)
    # sft_import stores each image and conversation once; sft_shards hold the features and a reference.
    storage = a.sft_samples * (a.sft_sample_kb * 1e3 + FEATURE_BYTES_PER_IMAGE + ROW_METADATA_BYTES)
    return Phase("sft_teacher", f"{_n(a.sft_samples)} SFT images x 382 GFLOP (+ sft_shards)", wall, a.gpus,
                 a.gpus * wall / 3600, a.gpus * a.cpus_per_gpu * wall / 3600, storage,
                 "GPU" if gpu_wall >= decode_wall else "CPU decode",
                 [f"GPU-bound time {_t(gpu_wall)}, CPU decode-bound time {_t(decode_wall)}"])  # fmt: skip


def convert_phase(a: Assumptions) -> Phase:
    """breen.convert: read the Qwen2 checkpoint (bf16) and write the stage-1 BREEN directory (every stored
    parameter in bf16: the LLM, its copy as the image expert, the vision side); a 4-CPU job."""
    from breen.config import BreenConfig

    counts = BreenConfig.preset(a.preset).param_counts()
    qwen = 2.0 * sum(counts[c] for c in ("embed_tokens", "lm_head", "attention", "norms", "text_experts"))
    out = 2.0 * counts["stored"]
    wall = (qwen + out) / (a.convert_gbps * 1e9)
    return Phase("convert", f"Qwen2 {_b(qwen)} -> BREEN init {_b(out)}", wall, 0, 0.0, 4 * wall / 3600, out,
                 "disk", [f"reads {_b(qwen)} and writes {_b(out)} at {a.convert_gbps:g} GB/s; can overlap "
                          "data preparation (counted back to back here)"])  # fmt: skip


def stage_flops(a: Assumptions, stage: str) -> float:
    """Training FLOPs of one stage: samples * tokens * flops_per_token(tokens), one sample per sequence."""
    from breen.config import BreenConfig

    tokens = a.tokens_per_sample(stage)
    per_token = BreenConfig.preset(a.preset).flops_per_token(tokens)
    return a.stage_samples(stage) * tokens * per_token


def checkpoint_bytes(a: Assumptions, stage: str) -> float:
    """One ZeRO-3 checkpoint: bf16 weights of every stored parameter + 12 bytes (fp32 master, Adam m, v)
    per trainable parameter of the stage."""
    from breen.config import BreenConfig
    from breen.stages import trainable_components

    config = BreenConfig.preset(a.preset)
    counts = config.param_counts()
    trainable = sum(counts[c] for c in trainable_components(config, stage))
    return 2.0 * counts["stored"] + 12.0 * trainable


def stage_phase(a: Assumptions, stage: str) -> Phase:
    gpus = a.stage_gpus(stage)
    samples = a.stage_samples(stage)
    gpu_s = stage_flops(a, stage) / (a.peak * a.mfu)
    gpu_wall = gpu_s / gpus
    cpus = gpus * a.cpus_per_gpu
    ingest_wall = samples / (a.rates["ingest_samples_per_s_per_core"] * cpus)
    wall = max(gpu_wall, ingest_wall)
    from breen.config import BreenConfig

    final = 2.0 * BreenConfig.preset(a.preset).param_counts()["stored"]
    storage = a.checkpoints * checkpoint_bytes(a, stage) + final
    notes = [f"{a.tokens_per_sample(stage)} tokens/sample, needs {samples / gpu_wall:,.0f} samples/s "
             f"= {samples / gpu_wall / a.rates['ingest_samples_per_s_per_core']:,.0f} ingest cores "
             f"of {cpus} on the GPU nodes"]  # fmt: skip
    if ingest_wall > gpu_wall:
        notes.append("WARNING: CPU ingest is the bottleneck; GPUs would wait (add CPUs per GPU)")
    return Phase(stage, f"{_n(samples)} samples", wall, gpus, gpus * wall / 3600,
                 cpus * wall / 3600, storage, "GPU" if gpu_wall >= ingest_wall else "CPU ingest", notes)  # fmt: skip


def storage_traffic(a: Assumptions, phase: str) -> tuple[float, int]:
    """(bytes the phase reads from and writes to the datasets' storage, nodes moving them)."""
    cpu_nodes = max(1, math.ceil(a.cpu_cores / a.cpu_cores_per_node))
    row_with_features = a.image_kb * 1e3 + FEATURE_BYTES_PER_IMAGE + ROW_METADATA_BYTES
    if phase == "download":  # writes every stored image once
        return a.downloaded * (a.image_kb * 1e3 + ROW_METADATA_BYTES), cpu_nodes
    if phase == "filter":  # reads every image (decode check, hash), writes decisions
        return a.downloaded * (a.image_kb * 1e3 + 2 * ROW_METADATA_BYTES), cpu_nodes
    if phase == "teacher":  # reads the kept images, writes features
        return a.pairs * row_with_features, max(1, math.ceil(a.gpus / a.gpus_per_node))
    if phase == "sft_teacher":
        return a.sft_samples * (2 * a.sft_sample_kb * 1e3 + FEATURE_BYTES_PER_IMAGE), max(
            1, math.ceil(a.gpus / a.gpus_per_node))  # fmt: skip
    if phase == "convert":  # one pod reads Qwen2 and writes the BREEN init
        from breen.config import BreenConfig

        counts = BreenConfig.preset(a.preset).param_counts()
        qwen = 2.0 * sum(counts[c] for c in ("embed_tokens", "lm_head", "attention", "norms", "text_experts"))
        return qwen + 2.0 * counts["stored"], 1
    # a training stage: the ingest reads image + features + text of every sample once
    return a.stage_samples(phase) * row_with_features, max(1, math.ceil(a.stage_gpus(phase) / a.gpus_per_node))


def bound_by_bucket(a: Assumptions, p: Phase) -> None:
    """With the datasets in a bucket: the phase takes at least its traffic over its nodes' bandwidth."""
    moved, nodes = storage_traffic(a, p.name)
    wall = moved * 8 / (nodes * a.bucket_gbps_per_node * 1e9)
    p.notes.append(f"bucket: moves {_b(moved)} over {nodes} node(s) at {a.bucket_gbps_per_node:g} Gbit/s each: "
                   f"{_t(wall)}")  # fmt: skip
    if p.name in STAGES:
        upload = checkpoint_bytes(a, p.name) * 8 / (nodes * a.bucket_gbps_per_node * 1e9)
        p.notes.append(f"bucket: each checkpoint ({_b(checkpoint_bytes(a, p.name))}) uploads in {upload:,.0f} s, "
                       "in the background (asynchronous upload); keep the checkpoint interval longer")  # fmt: skip
    if wall > p.wall_s:
        scale = wall / p.wall_s if p.wall_s > 0 else 1.0
        p.gpu_hours, p.cpu_hours = p.gpu_hours * scale, p.cpu_hours * scale
        p.wall_s, p.bound = wall, "bucket"


def plan(a: Assumptions) -> list[Phase]:
    """Every phase in run order (each starts when the previous one ends)."""
    a.validate()
    phases = [download_phase(a), filter_phase(a), teacher_phase(a), sft_teacher_phase(a), convert_phase(a)]
    phases += [stage_phase(a, s) for s in STAGES]
    if a.storage == "bucket":
        for p in phases:
            bound_by_bucket(a, p)
    return phases


def timeline(phases: list[Phase]) -> list[tuple[str, float, float]]:
    """(name, start_s, end_s) of each phase run back to back."""
    out, t = [], 0.0
    for p in phases:
        out.append((p.name, t, t + p.wall_s))
        t += p.wall_s
    return out


# --------------------------------------------------------------------------------------- output
def _n(x: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _t(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min"


def _b(nbytes: float) -> str:
    for unit, div in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= div:
            return f"{nbytes / div:.2f} {unit}"
    return f"{nbytes:.0f} B"


def describe(a: Assumptions) -> list[str]:
    """Every assumption, one line each."""
    from breen.config import BreenConfig

    config = BreenConfig.preset(a.preset)
    counts = config.param_counts()
    lines = [
        f"pairs reaching training: {_n(a.pairs)}; URLs to download = pairs / (download_ok {a.download_ok:g}"
        f" * filter_keep {a.filter_keep:g}) = {_n(a.urls)}",
        f"download_ok {a.download_ok:g}: {SOURCES['download_ok'] if a.download_ok == Assumptions.download_ok else 'given'}",
        f"GPUs: {a.gpus} x {a.gpu_type} for the teacher and stages 1-2, {a.gpus_stage3} for stage 3; peak "
        f"{a.peak / 1e12:g} TFLOP/s dense bf16 per GPU",
        f"MFU: training {a.mfu:g}, teacher {a.teacher_mfu:g} (model FLOPs / peak; recomputation and "
        f"communication overheads are inside the MFU)",
        f"teacher: CLIP ViT-L/14-336 forward = {CLIP_L14_336_FLOPS_PER_IMAGE / 1e9:g} GFLOP per image, run "
        f"once per kept pair",
        f"model: preset {a.preset}, {counts['active'] / 1e9:.2f}B active / {counts['stored'] / 1e9:.2f}B stored "
        f"parameters; FLOPs per token = 6 * active matmul params + attention (BreenConfig.flops_per_token); "
        f"every stage counted as full forward + backward (stage 1's frozen weights would save some)",
        f"tokens per sample: {a.image_tokens} image + {N_QUERIES} queries + {a.caption_tokens} caption "
        f"(stages 1-2) or {a.sft_text_tokens} text (stage 3); samples packed (data.packing), so no padding is "
        f"counted",
        f"samples: stage 1 {_n(a.stage_samples('stage1'))} ({a.stage1_fraction:.3f} of the pairs), stage 2 "
        f"{_n(a.stage_samples('stage2'))}, stage 3 {_n(a.sft_samples)} SFT; one epoch each",
        f"sft_samples {_n(a.sft_samples)}: {SOURCES['sft_samples'] if a.sft_samples == Assumptions.sft_samples else 'given'}; "
        f"the SFT teacher pass counts one image per sample",
        f"convert: {a.convert_gbps:g} GB/s ({SOURCES['convert_gbps']})",
        f"CPU data steps: {a.cpu_cores} cores; ingress {a.ingress_gbps:g} Gbit/s, {a.source_image_kb:g} KB "
        f"per source image; GPU nodes: {a.cpus_per_gpu} CPUs per GPU",
        f"storage: {a.image_kb:g} KB per stored image, {FEATURE_BYTES_PER_IMAGE / 1e3:.1f} KB of teacher "
        f"features; image bytes stored once (download/), the training shards reference them; "
        f"{ROW_METADATA_BYTES} B of text and decisions per row in captions/, filter/ and shards/; "
        f"{a.checkpoints} ZeRO-3 checkpoints per stage ("
        f"{SOURCES['keep_checkpoints'] if a.keep_checkpoints is None else 'given'}) + the final bf16 weights",
        "phases run back to back; GPU/CPU-hours are allocated hours (devices x wall time); scaling is "
        "linear in workers (no straggler or start-up time)",
        (f"storage: a bucket (object store); each phase also bounded by its traffic at "
         f"{a.bucket_gbps_per_node:g} Gbit/s per node ({a.cpu_cores_per_node} cores per CPU node, "
         f"{a.gpus_per_node} GPUs per GPU node) "
         f"({SOURCES['bucket_gbps_per_node'] if a.bucket_gbps_per_node == Assumptions.bucket_gbps_per_node else 'given'}); "
         "request costs negligible (one object of megabytes per shard file, a few requests per shard); "
         "egress charges apply only across regions: keep the cluster in the bucket's region"
         if a.storage == "bucket" else
         f"storage: a shared ReadWriteMany volume (--storage bucket plans an object store instead, at "
         f"--bucket-gbps-per-node {Assumptions.bucket_gbps_per_node:g} by default: "
         f"{SOURCES['bucket_gbps_per_node']})"),
    ]
    for key in DEFAULT_RATES:
        lines.append(f"rate {key} = {a.rates[key]:g}: {a.rate_sources.get(key, 'default')}")
    return lines


def format_plan(a: Assumptions, phases: list[Phase]) -> str:
    head = (
        f"{'phase':<12}{'wall':>9}{'GPUs':>6}{'GPU-h':>10}{'CPU-h':>10}{'storage':>11}  {'bound by':<11} what"
    )
    lines = [f"BREEN capacity plan: {_n(a.pairs)} pairs, {a.gpus} x {a.gpu_type}", "", head, "-" * len(head)]
    for p in phases:
        lines.append(f"{p.name:<12}{_t(p.wall_s):>9}{p.gpus or '-':>6}{p.gpu_hours:>10,.0f}{p.cpu_hours:>10,.0f}"
                     f"{_b(p.storage_bytes):>11}  {p.bound:<11} {p.what}")  # fmt: skip
    total_wall = sum(p.wall_s for p in phases)
    lines.append("-" * len(head))
    lines.append(f"{'total':<12}{_t(total_wall):>9}{'':>6}{sum(p.gpu_hours for p in phases):>10,.0f}"
                 f"{sum(p.cpu_hours for p in phases):>10,.0f}{_b(sum(p.storage_bytes for p in phases)):>11}")  # fmt: skip
    lines.append("")
    for p in phases:
        for note in p.notes:
            lines.append(f"  {p.name}: {note}")
    lines += ["", "Assumptions:"] + [f"  - {line}" for line in describe(a)]
    return "\n".join(lines)


def write_chart(phases: list[Phase], path: Path, title: str) -> Path:
    """A Gantt-style PNG of the phases run back to back (hours on the x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans = timeline(phases)
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(spans) + 1.5))
    colours = {"download": "#8da0cb", "filter": "#8da0cb", "teacher": "#fc8d62"}
    for i, (p, (name, start, end)) in enumerate(zip(phases, spans, strict=True)):
        ax.barh(i, (end - start) / 3600, left=start / 3600, color=colours.get(name, "#66c2a5"))
        label = f"{_t(end - start)}" + (f", {p.gpus} GPUs" if p.gpus else ", CPU")
        ax.text(end / 3600, i, "  " + label, va="center", fontsize=9)
    ax.set_yticks(range(len(spans)), [s[0] for s in spans])
    ax.invert_yaxis()
    ax.set_xlabel("hours from start")
    ax.set_xlim(0, spans[-1][2] / 3600 * 1.25 if spans[-1][2] > 0 else 1)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Assumptions()
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The module docstring as written, and every option's default."""

    ap = argparse.ArgumentParser(prog="python -m jobs.plan", description=__doc__, formatter_class=Help)
    ap.add_argument("--pairs", type=float, default=d.pairs, help="image-text pairs reaching training")
    ap.add_argument("--gpus", type=int, default=d.gpus, help="GPUs for the teacher and stages 1-2")
    ap.add_argument(
        "--stage3-gpus", type=int, default=None, help="GPUs for stage 3 (None: half of --gpus)"
    )
    ap.add_argument("--gpu-type", default=d.gpu_type, help=f"one of {sorted(GPU_PEAK_FLOPS)}")
    ap.add_argument(
        "--gpu-peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s per GPU (None: the GPU type's)"
    )
    ap.add_argument("--mfu", type=float, default=d.mfu, help="training model-FLOPs utilisation")
    ap.add_argument("--teacher-mfu", type=float, default=d.teacher_mfu,
                    help="model-FLOPs utilisation of the CLIP teacher (bf16 forward, large batches)")
    ap.add_argument("--cpu-cores", type=int, default=d.cpu_cores, help="CPU cores for download and filter")
    ap.add_argument("--cpus-per-gpu", type=int, default=d.cpus_per_gpu, help="CPUs per GPU on the GPU nodes (ingest)")
    ap.add_argument("--ingress-gbps", type=float, default=d.ingress_gbps,
                    help="cluster download bandwidth from the internet, Gbit/s")
    ap.add_argument(
        "--download-ok",
        type=float,
        default=d.download_ok,
        help="fraction of URLs that download and decode (img2dataset reports 77-81%%)",
    )
    ap.add_argument("--filter-keep", type=float, default=d.filter_keep,
                    help="fraction of downloaded images the filter keeps")
    ap.add_argument("--source-image-kb", type=float, default=d.source_image_kb,
                    help="mean source image size as served, KB (network transfer)")
    ap.add_argument("--image-kb", type=float, default=d.image_kb,
                    help="mean stored image size, KB (long side <= 672, JPEG q95)")
    ap.add_argument("--stage1-fraction", type=float, default=d.stage1_fraction,
                    help="share of the pairs stage 1 trains on (4M of 13M); stage 2 takes the rest")
    ap.add_argument(
        "--sft-samples", type=float, default=d.sft_samples, help="stage-3 SFT samples (BREEN: 4M)"
    )
    ap.add_argument("--image-tokens", type=int, default=d.image_tokens,
                    help="image tokens per sample (48x48 for a square 672 image, the maximum)")
    ap.add_argument("--caption-tokens", type=int, default=d.caption_tokens,
                    help="text tokens per stage-1/2 sample")
    ap.add_argument("--sft-text-tokens", type=int, default=d.sft_text_tokens,
                    help="text tokens per stage-3 sample (question, repeated question, answer)")
    ap.add_argument(
        "--keep-checkpoints",
        type=int,
        default=None,
        help="checkpoints kept per stage (None: checkpoint.keep_last of the stage configs)",
    )
    ap.add_argument("--convert-gbps", type=float, default=d.convert_gbps, help="conversion disk GB/s")
    ap.add_argument("--storage", choices=("volume", "bucket"), default=d.storage,
                    help="datasets and checkpoints on a shared volume or in an object store")
    ap.add_argument("--bucket-gbps-per-node", type=float, default=d.bucket_gbps_per_node,
                    help="Gbit/s each node moves to and from the bucket (--storage bucket)")
    ap.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node, help="GPUs per GPU node")
    ap.add_argument("--cpu-cores-per-node", type=int, default=d.cpu_cores_per_node,
                    help="CPU cores per CPU node (bucket traffic is per node)")  # fmt: skip
    ap.add_argument("--preset", default=d.preset, help="BREEN model preset (breen.config)")
    ap.add_argument("--rates", type=Path, default=DEFAULT_RATES_FILE, help="per-core rates JSON")
    ap.add_argument(
        "--out", type=Path, default=Path("runs/plan"), help="folder for timeline.png and plan.json"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rates, sources = load_rates(args.rates)
    a = Assumptions(
        pairs=args.pairs, gpus=args.gpus, stage3_gpus=args.stage3_gpus, gpu_type=args.gpu_type.lower(),
        gpu_peak_flops=args.gpu_peak_tflops * 1e12 if args.gpu_peak_tflops else None, mfu=args.mfu,
        teacher_mfu=args.teacher_mfu, cpu_cores=args.cpu_cores, cpus_per_gpu=args.cpus_per_gpu,
        ingress_gbps=args.ingress_gbps, download_ok=args.download_ok, filter_keep=args.filter_keep,
        source_image_kb=args.source_image_kb, image_kb=args.image_kb, stage1_fraction=args.stage1_fraction,
        sft_samples=args.sft_samples, image_tokens=args.image_tokens, caption_tokens=args.caption_tokens,
        sft_text_tokens=args.sft_text_tokens, keep_checkpoints=args.keep_checkpoints, preset=args.preset,
        convert_gbps=args.convert_gbps, storage=args.storage, bucket_gbps_per_node=args.bucket_gbps_per_node,
        gpus_per_node=args.gpus_per_node, cpu_cores_per_node=args.cpu_cores_per_node,
        rates=rates, rate_sources=sources,
    )  # fmt: skip
    try:
        phases = plan(a)
    except ValueError as e:
        print(f"jobs.plan: {e}", file=sys.stderr)
        return 2
    print(format_plan(a, phases))
    chart = write_chart(
        phases, args.out / "timeline.png", f"BREEN: {_n(a.pairs)} pairs on {a.gpus} x {a.gpu_type}"
    )
    doc: dict[str, Any] = {
        "assumptions": {k: v for k, v in asdict(a).items()},
        "phases": [asdict(p) for p in phases],
        "timeline": [{"phase": n, "start_s": s, "end_s": e} for n, s, e in timeline(phases)],
        "total": {"wall_s": sum(p.wall_s for p in phases), "gpu_hours": sum(p.gpu_hours for p in phases),
                  "cpu_hours": sum(p.cpu_hours for p in phases),
                  "storage_bytes": sum(p.storage_bytes for p in phases)},
    }  # fmt: skip
    (args.out / "plan.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\ntimeline chart: {chart}\nplan as JSON:   {args.out / 'plan.json'}")
    return 0 if all(math.isfinite(p.wall_s) for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
