"""Typed configuration for the data-preparation pipeline.

One YAML file defines a whole data-prep run (see `pipelines/configs/demo.yaml`).
Every step reads the same file; each reads only its own section plus `output_dir`.
Loading is strict: an unknown key, a wrong type or a missing input file fails
fast with a `ConfigError` naming the dotted field (e.g. `filter.min_short_side`).

    from pipelines.config import load_config
    cfg = load_config("pipelines/configs/demo.yaml", overrides=["teacher.batch_size=8"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from breen.settings import ConfigError, apply_override, build, check_finite, read_yaml
from breen.storage import Store, scheme
from breen.teacher import PREPROCESS_RULES, PREPROCESS_VERSION  # numpy and PIL only

# Field metadata of settings that change how fast a step runs, never what it writes (actor counts, CPUs,
# GPUs, batch sizes, threads, retries): left out of dataset fingerprints (`output_fields`).
RESOURCE = {"resource": True}


def output_fields(obj: Any) -> Any:
    """`to_dict(obj)` without its `RESOURCE` fields, at every level: what a dataset fingerprint records."""
    if dataclasses.is_dataclass(obj):
        return {f.name: output_fields(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("resource")}  # fmt: skip
    if isinstance(obj, list | tuple):
        return [output_fields(v) for v in obj]
    return obj


@dataclass
class SyntheticInput:
    """Demo/test input: generate a synthetic corpus and serve it from 127.0.0.1."""

    n_images: int = 300
    seed: int = 0
    url_list_format: str = "parquet"
    port: int = 18642  # fixed so reruns see the same URLs; 0 picks any free port


@dataclass
class SftInput:
    """LLaVA-style SFT input: a JSON array of records plus an image folder."""

    json: str = ""
    image_folder: str = ""


@dataclass
class InputConfig:
    # URL lists: .parquet, .csv, .tsv, .jsonl (or .json lines); columns `url`, `caption`, extras carried.
    urls: list[str] = field(default_factory=list)
    synthetic: SyntheticInput | None = None
    sft: SftInput | None = None


@dataclass
class RayConfig:
    # None: attach to RAY_ADDRESS / a running cluster if any, else start an embedded local Ray.
    address: str | None = None
    # Logical CPUs for an embedded local Ray (more than the cores so actors and tasks can overlap).
    num_cpus: int | None = None


@dataclass
class DownloadConfig:
    rows_per_shard: int = 10_000
    image_size: int = 672  # long side <= image_size, never upscaled
    encode_format: str = "jpg"
    encode_quality: int = 95
    threads_per_shard: int = field(default=32, metadata=RESOURCE)
    timeout_s: float = 10.0  # per socket operation (connect, each read)
    # Total time of one download (connect, redirects, headers, body); None: max(3 * timeout_s, 30).
    total_timeout_s: float | None = None
    retries: int = 0  # img2dataset per-URL retries
    max_shard_retries: int = field(default=3, metadata=RESOURCE)  # Ray task retries per shard
    max_response_bytes: int = 32 * 1024 * 1024
    # Hosts or CIDRs explicitly allowed even though they are loopback/private/link-local.
    allow_private: list[str] = field(default_factory=list)
    user_agent: str = "breen-pipeline/0.1 (img2dataset)"
    cpus_per_shard: float = field(default=1.0, metadata=RESOURCE)


@dataclass
class FilterConfig:
    preset: str | None = None  # "datacomp-basic" fills the fields below unless set explicitly
    min_short_side: int | None = None
    max_aspect_ratio: float | None = None
    max_pixels: int = 40_000_000  # decode guard (header dims) before full decode
    min_words: int | None = None  # caption must have at least this many words
    min_chars: int | None = None  # caption must have at least this many characters
    languages: list[str] | None = None  # fastText labels (ISO 639-1) to keep, e.g. ["en"]; None keeps all
    # kept when a wanted language is at least this x as likely as the top language (fastText lid.176):
    # 0.5 keeps 99.4% of short English captions and rejects 97.8% of others (`bench.language`)
    language_min_ratio: float = 0.5
    dedup_exact: bool = True
    near_dup_max_distance: int | None = (
        3  # perceptual-hash Hamming distance (<= 3: exact recall); None disables
    )
    cpus_per_actor: float = field(default=1.0, metadata=RESOURCE)
    num_actors: int = field(default=2, metadata=RESOURCE)


@dataclass
class CaptionsConfig:
    max_chars: int = 1000
    min_chars: int = 1
    remove_urls: bool = True
    remove_emails: bool = True
    cpus_per_actor: float = field(default=0.5, metadata=RESOURCE)
    num_actors: int = field(default=2, metadata=RESOURCE)


@dataclass
class TeacherConfig:
    model: str = "ViT-L-14-336"  # open_clip model name
    weights: str | None = None  # local weights file (.safetensors/.bin/.pt, loaded without unpickling code)
    pretrained: str | None = None  # open_clip pretrained tag (needs the weights cached locally)
    random_init_seed: int | None = None  # tests/demo: random weights from this seed
    model_config: str | None = None  # JSON file with a custom open_clip config (e.g. a tiny ViT)
    batch_size: int = field(default=32, metadata=RESOURCE)
    num_actors: int = field(default=1, metadata=RESOURCE)
    num_gpus_per_actor: float = field(default=1.0, metadata=RESOURCE)  # used only when the cluster has GPUs
    cpus_per_actor: float = field(default=1.0, metadata=RESOURCE)
    device: str = field(default="auto", metadata=RESOURCE)  # auto | cpu | cuda
    # Decode + letterbox threads per actor, running ahead of the model (PIL releases the GIL): -1 = auto
    # (cpus_per_actor on GPU, where decode must keep up with the GPU; 0 on CPU: decode inline).
    decode_threads: int = field(default=-1, metadata=RESOURCE)
    prefetch_batches: int = field(default=2, metadata=RESOURCE)  # batches decoded ahead of the one in the model (with decode threads)
    # canvas rule (`breen.teacher.PREPROCESS_RULES`): the released BREEN code's by default;
    # "letterbox-336-mean-bicubic-v1" reproduces datasets made before it
    preprocess: str = PREPROCESS_VERSION


@dataclass
class ShardsConfig:
    rows_per_file: int = 1024


@dataclass
class StorageConfig:
    # S3-compatible store (MinIO, Ceph, R2): "host:port" or "http(s)://host:port"; None: AWS, or the
    # AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL variables. Credentials never go here (`breen.storage`).
    endpoint_override: str | None = None


@dataclass
class PrepareConfig:
    # a local folder, s3://bucket/prefix or gs://bucket/prefix (`breen.storage`)
    output_dir: str = "runs/prep"
    input: InputConfig = field(default_factory=InputConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    # Where the config came from (set by the loader; relative paths are resolved against it).
    source: str = ""
    # Set by the command line, not by config files: `--redo` recomputes a dataset made from another spec
    # (`pipelines.fingerprint`) instead of refusing it; `--wait` waits this long for another run's lease.
    redo: bool = False
    wait_s: float = 0.0

    @property
    def out(self) -> Store:
        """The output location (`output_dir` on local disk or an object store)."""
        return self.location(self.output_dir, "output_dir")

    def location(self, uri: str, field_name: str) -> Store:
        """A path or URI of this config as a `breen.storage.Store` (with the config's endpoint)."""
        return Store.at(uri, field_name, self.storage.endpoint_override)


PRESETS: dict[str, dict[str, Any]] = {
    # DataComp "basic" filtering: English, caption > 2 words and > 5 characters,
    # short side >= 200 px, aspect ratio <= 3.
    "datacomp-basic": {
        "min_short_side": 200,
        "max_aspect_ratio": 3.0,
        "min_words": 3,
        "min_chars": 6,
        "languages": ["en"],
    }
}


def apply_preset(f: FilterConfig) -> FilterConfig:
    """Fill the fields left unset (None) from the named preset."""
    if f.preset is None:
        return f
    if f.preset not in PRESETS:
        raise ConfigError(f"filter.preset: unknown preset {f.preset!r} (known: {sorted(PRESETS)})")
    for k, v in PRESETS[f.preset].items():
        if getattr(f, k) is None:
            setattr(f, k, v)
    return f


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build a section dataclass `cls` from plain data, strictly (a step reads its own section this way)."""
    return build(cls, data, prefix)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def check_locations(cfg: PrepareConfig, where: str) -> None:
    """Data locations (output_dir, URL lists, SFT inputs, the teacher weights) may be local or on an object
    store: an unknown scheme or a URI with credentials fails here, naming the field. A custom teacher
    model config must be local (`breen.storage.require_local`)."""
    from breen.storage import require_local

    fields = {"output_dir": cfg.output_dir, **{f"input.urls[{i}]": u for i, u in enumerate(cfg.input.urls)}}
    if cfg.input.sft is not None:
        fields |= {"input.sft.json": cfg.input.sft.json, "input.sft.image_folder": cfg.input.sft.image_folder}
    if cfg.teacher.weights is not None:
        fields["teacher.weights"] = cfg.teacher.weights
    try:
        for name, value in fields.items():
            cfg.location(value, name)
        cfg.teacher.model_config = require_local(cfg.teacher.model_config, "teacher.model_config")
    except ValueError as e:  # StorageError included
        raise ConfigError(f"{where}: {e}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> PrepareConfig:
    """Load (`breen.settings.read_yaml`: ``base:`` files merged), override (``--set`` KEY=VALUE),
    validate and resolve a pipeline config file."""
    path = Path(path)
    data = read_yaml(path)
    try:
        cfg: PrepareConfig = build(PrepareConfig, data)
        for item in overrides or []:
            apply_override(cfg, item)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg.source = str(path)
    base = path.parent.resolve()
    check_locations(cfg, str(path))

    def resolve(p: str) -> str:
        # Local paths in a config file are relative to the current directory if they exist there, else to
        # the config file's folder; URIs are kept (object stores are checked before Ray starts:
        # `pipelines.preflight`).
        if scheme(p) == "file":
            p = p[len("file://") :]
        if scheme(p) is not None:
            return p
        return p if Path(p).is_absolute() or Path(p).exists() else str(base / p)

    cfg.input.urls = [resolve(u) for u in cfg.input.urls]
    for i, u in enumerate(cfg.input.urls):
        if scheme(u) is None and not Path(u).is_file():
            raise ConfigError(f"{path}: input.urls[{i}]: file not found: {u}")
    if cfg.input.sft is not None:
        cfg.input.sft.json = resolve(cfg.input.sft.json)
        cfg.input.sft.image_folder = resolve(cfg.input.sft.image_folder)
        if scheme(cfg.input.sft.json) is None and not Path(cfg.input.sft.json).is_file():
            raise ConfigError(f"{path}: input.sft.json: file not found: {cfg.input.sft.json}")
        folder = cfg.input.sft.image_folder
        if scheme(folder) is None and not Path(folder).is_dir():
            raise ConfigError(f"{path}: input.sft.image_folder: not a folder: {folder}")
    for name in ("weights", "model_config"):
        value = getattr(cfg.teacher, name)
        if value is not None:
            value = resolve(value)
            setattr(cfg.teacher, name, value)
            if scheme(value) is None and not Path(value).is_file():
                raise ConfigError(f"{path}: teacher.{name}: file not found: {value}")
    try:
        apply_preset(cfg.filter)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    validate(cfg, str(path))
    return cfg


def validate(cfg: PrepareConfig, where: str = "config") -> None:
    """Range checks that types alone cannot express: every float finite (no nan or inf anywhere), then
    each value in its range."""

    def need(cond: bool, field_name: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{where}: {field_name}: {msg}")

    check_finite(cfg, f"{where}: ")
    need(cfg.download.rows_per_shard > 0, "download.rows_per_shard", "must be > 0")
    need(cfg.download.image_size >= 28, "download.image_size", "must be >= 28")
    need(cfg.download.encode_format in ("jpg", "png", "webp"), "download.encode_format", "jpg, png or webp")
    need(cfg.download.timeout_s > 0, "download.timeout_s", "must be > 0")
    total = cfg.download.total_timeout_s
    need(total is None or total > 0, "download.total_timeout_s", "must be > 0 (or null)")
    need(cfg.download.max_response_bytes > 0, "download.max_response_bytes", "must be > 0")
    need(cfg.download.threads_per_shard > 0, "download.threads_per_shard", "must be > 0")
    need(cfg.shards.rows_per_file > 0, "shards.rows_per_file", "must be > 0")
    need(cfg.teacher.batch_size > 0, "teacher.batch_size", "must be > 0")
    need(cfg.teacher.num_actors > 0, "teacher.num_actors", "must be > 0")
    need(cfg.teacher.device in ("auto", "cpu", "cuda"), "teacher.device", "auto, cpu or cuda")
    sources = [cfg.teacher.weights, cfg.teacher.pretrained, cfg.teacher.random_init_seed]
    need(
        sum(s is not None for s in sources) == 1,
        "teacher.weights",
        "set exactly one of teacher.weights, teacher.pretrained, teacher.random_init_seed",
    )
    fmt = cfg.input.synthetic.url_list_format if cfg.input.synthetic else "parquet"
    need(
        fmt in ("parquet", "csv", "tsv", "jsonl"), "input.synthetic.url_list_format", "parquet|csv|tsv|jsonl"
    )
    if cfg.filter.max_aspect_ratio is not None:
        need(cfg.filter.max_aspect_ratio >= 1, "filter.max_aspect_ratio", "must be >= 1")
    need(0 < cfg.filter.language_min_ratio <= 1, "filter.language_min_ratio", "must be in (0, 1]")
    for name in ("download.cpus_per_shard", "filter.cpus_per_actor", "captions.cpus_per_actor",
                 "teacher.cpus_per_actor", "teacher.num_gpus_per_actor"):  # fmt: skip
        section, key = name.split(".")
        need(getattr(getattr(cfg, section), key) > 0, name, "must be > 0")
    need(cfg.teacher.preprocess in PREPROCESS_RULES, "teacher.preprocess", " or ".join(PREPROCESS_RULES))
