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
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from breen.storage import Store, scheme
from breen.teacher import PREPROCESS_RULES, PREPROCESS_VERSION  # numpy and PIL only


class ConfigError(ValueError):
    """A bad config value; the message names the field and the file."""


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


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert_value(tp: Any, value: Any, where: str, lenient: bool = False) -> Any:
    """Check/convert one value against a type hint; raise ConfigError naming `where`.

    Shared by the pipeline config (YAML files, strict) and the training config (`jobs.config`), which
    passes ``lenient=True`` for command-line overrides: "None" is null, "a,b" is a list, "4e-4" (a string
    in YAML 1.1) is a number and a number is accepted where a string is expected.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (lenient and value == "None"):
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert_value(a, value, where, lenient)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, where, lenient)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): convert_value(item, v, f"{where}.{k}", lenient) for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(tp)
        if lenient and isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple) if lenient else list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} ({value!r})")
        return [convert_value(item, v, f"{where}[{i}]", lenient) for i, v in enumerate(value)]
    if value is None:
        raise ConfigError(f"{where}: must not be null")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if lenient and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if lenient and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def build(cls: type, data: dict[str, Any], prefix: str = "", lenient: bool = False) -> Any:
    """Dataclass `cls` from plain data: unknown keys and wrong types raise ConfigError naming the field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{where}: unknown key (allowed here: {', '.join(sorted(names))})")
        kwargs[key] = convert_value(hints[key], value, where, lenient)
    return cls(**kwargs)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from plain data, strictly (unknown keys and wrong types raise)."""
    return build(cls, data, prefix)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. teacher.batch_size=8)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: not valid YAML: {e}") from None
    except RecursionError:  # PyYAML recurses once per nesting level
        raise ConfigError(
            f"override {key}: value nested too deeply to parse ({len(raw)} characters)"
        ) from None
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p} is not a section")
    node[parts[-1]] = value


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
    """Load, override (dotted KEY=VALUE), validate and resolve a pipeline config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    except RecursionError:  # PyYAML recurses once per nesting level
        raise ConfigError(f"{path}: not valid YAML: nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides or []:
        _apply_override(data, item)
    try:
        cfg: PrepareConfig = from_dict(PrepareConfig, data)
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

    for name, value in floats_in(to_dict(cfg)):
        need(math.isfinite(value), name, f"must be a finite number, got {value}")
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


def floats_in(node: Any, where: str = "") -> list[tuple[str, float]]:
    """(dotted name, value) of every float in a `to_dict` tree (dict values and list items included): what
    the pipelines' and the trainer's `validate` check for finiteness."""
    if isinstance(node, dict):
        return [x for k, v in node.items() for x in floats_in(v, f"{where}.{k}" if where else str(k))]
    if isinstance(node, list):
        return [x for i, v in enumerate(node) for x in floats_in(v, f"{where}[{i}]")]
    return [(where, node)] if isinstance(node, float) else []
