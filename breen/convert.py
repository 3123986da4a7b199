"""Build a BREEN model from a Hugging Face Qwen2 checkpoint (the stage-1 starting point).

Reads a Qwen2 directory: ``config.json``, ``model.safetensors`` or sharded ``model-*.safetensors`` (with or
without ``model.safetensors.index.json``), and the tokenizer files. Writes a BREEN directory in Hugging
Face layout (``config.json`` + safetensors + tokenizer) that `BreenForCausalLM.from_pretrained` loads; with
a tokenizer, also the processor and remote code (`breen.hf.save_hf_files`), so transformers' Auto classes
load it too.

Every Qwen2 tensor goes through the explicit key map `qwen2_key_map`: attention, norms, embeddings and
``lm_head`` keep their names; each layer's ``mlp.{gate,up,down}_proj`` is copied to *both*
``mlp.text_expert.*`` and ``mlp.image_expert.*``. An unexpected or missing key is an error. Parameters with
no Qwen2 counterpart (expert gates, patch embedding, queries, alignment head) get `init_weights` rules
from `BreenForCausalLM._init_weights`, reproducibly from ``--seed``.

Run with:
    python -m breen.convert --qwen /models/Qwen2.5-7B-Instruct --out /models/breen-7b-init \\
        [--dtype bfloat16] [--seed 0] [--config breen.yaml] [--set image_size=672 ...] [--print-config]
``--config`` (a YAML mapping of `BreenConfig` fields) and ``--set FIELD=VALUE`` override the config read
from Qwen's ``config.json`` (`breen.settings`, the options of every command); ``--print-config`` prints
the resolved `BreenConfig` and exits.
The 7B conversion needs about 27 GB of host memory in bf16 (the model is built on the meta device and
filled tensor by tensor; no fp32 copy of Qwen is kept). Either directory may be on an object store
(``s3://``, ``gs://``; endpoint from ``AWS_ENDPOINT_URL``): ``--qwen`` is fetched once into
``$BREEN_CACHE``, ``--out`` is written locally then uploaded with ``config.json`` last.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breen.settings import (
    ConfigError,
    add_config_arguments,
    check_finite,
    convert_value,
    read_yaml,
    split_override,
    to_yaml,
)
from breen.storage import StorageError, Store, fetch_dir

if TYPE_CHECKING:  # torch, transformers and the model load only when converting: `--help` returns at once
    import torch

    from breen.config import BreenConfig
    from breen.model import BreenForCausalLM

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
_ATTENTION_KEYS = (
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)


def qwen2_key_map(config: BreenConfig) -> dict[str, tuple[str, ...]]:
    """Qwen2 state-dict key -> the BREEN keys it initialises (one, or two for the FFN)."""
    key_map: dict[str, tuple[str, ...]] = {
        "model.embed_tokens.weight": ("model.embed_tokens.weight",),
        "model.norm.weight": ("model.norm.weight",),
    }
    if not config.tie_word_embeddings:
        key_map["lm_head.weight"] = ("lm_head.weight",)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for name in _ATTENTION_KEYS:
            key_map[p + name] = (p + name,)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            key_map[f"{p}mlp.{proj}.weight"] = (
                f"{p}mlp.text_expert.{proj}.weight",
                f"{p}mlp.image_expert.{proj}.weight",
            )
    return key_map


def safetensors_entries(directory: str | Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(key, read) for every tensor of every ``*.safetensors`` file in `directory`: files in name order,
    keys sorted within a file; ``read()`` loads that tensor (valid until the next entry). The one reader of
    safetensors checkpoints: `iter_safetensors` reads every tensor; ZeRO-3 loading
    (`jobs.model_init.load_weights_zero3`) walks the same keys on every rank and reads on rank 0 only."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory} (only safetensors checkpoints are loaded)")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in sorted(f.keys()):
                yield key, functools.partial(f.get_tensor, key)


def iter_safetensors(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for every tensor of every ``*.safetensors`` file in `directory`, one at a time."""
    for key, read in safetensors_entries(directory):
        yield key, read()


def convert_qwen2(
    qwen_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    **config_overrides,
) -> BreenForCausalLM:
    """Load a local Qwen2 checkpoint into a new `BreenForCausalLM` (on CPU, in `dtype`: float32 if None)."""
    import torch

    from breen.config import BreenConfig
    from breen.model import BreenForCausalLM

    dtype = dtype or torch.float32
    qwen_dir = Path(qwen_dir)
    with open(qwen_dir / "config.json") as f:
        config = BreenConfig.from_qwen2_config(json.load(f), **config_overrides)
    with torch.device("meta"):
        model = BreenForCausalLM._from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    model.tie_weights()

    key_map = qwen2_key_map(config)
    loaded: set[str] = set()
    with torch.no_grad():
        for key, tensor in iter_safetensors(qwen_dir):
            if key not in key_map:
                if key == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # a tied checkpoint may still store the shared matrix twice
                raise KeyError(f"unexpected Qwen2 key {key!r} (not in the BREEN key map)")
            for target in key_map[key]:
                param = model.get_parameter(target)
                if param.shape != tensor.shape:
                    raise ValueError(
                        f"{key}: checkpoint shape {tuple(tensor.shape)} != {target} {tuple(param.shape)}"
                    )
                param.copy_(tensor.to(dtype))
                param._is_hf_initialized = True  # initialize_weights() skips it
            loaded.add(key)
    missing = sorted(set(key_map) - loaded)
    if missing:
        raise KeyError(f"Qwen2 checkpoint lacks {len(missing)} keys, e.g. {missing[:3]}")

    torch.manual_seed(seed)
    model.initialize_weights()  # everything not loaded: gates, patch embedding, queries, alignment head
    model.tie_weights()
    for param in model.parameters():
        if hasattr(param, "_is_hf_initialized"):
            del param._is_hf_initialized
    return model.eval()


def fresh_parameter_names(config: BreenConfig) -> list[str]:
    """BREEN parameters with no Qwen2 counterpart (initialised by `init_weights` rules)."""
    import torch

    from breen.model import BreenForCausalLM

    targets = {t for ts in qwen2_key_map(config).values() for t in ts}
    with torch.device("meta"):
        model = BreenForCausalLM(config)
    return [n for n, _ in model.named_parameters() if n not in targets]


def config_overrides(config_file: str | None, items: list[str]) -> dict[str, Any]:
    """`BreenConfig` overrides from a YAML file (``field: value``) and ``--set FIELD=VALUE`` items, typed
    against the fields `BreenConfig` declares; a bad one is a ConfigError naming the field (and file)."""
    import inspect

    from breen.config import BreenConfig

    hints = inspect.get_annotations(BreenConfig, eval_str=True)
    layers = [(read_yaml(config_file), False, f"{config_file}: ")] if config_file else []
    layers.append((dict(split_override(item) for item in items), True, ""))
    out: dict[str, Any] = {}
    for data, cli, where in layers:
        for key, value in data.items():
            if key not in hints:
                raise ConfigError(f"{where}{key}: unknown BreenConfig field (allowed: {', '.join(hints)})")
            out[key] = convert_value(hints[key], value, f"{where}{key}", cli)
    check_finite(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m breen.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--qwen", required=True,
                        help="Hugging Face Qwen2 directory (safetensors): a folder, or s3:// / gs:// (fetched once)")
    parser.add_argument("--out", required=True, help="output BREEN directory: a folder, or s3:// / gs://")  # fmt: skip
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    add_config_arguments(parser, "YAML mapping of BreenConfig fields to override (e.g. image_size: 448)")
    args = parser.parse_args(argv)
    try:
        overrides = config_overrides(args.config, args.set)
    except ConfigError as e:
        parser.error(str(e))
    try:  # both locations checked before the conversion (minutes for 7B)
        out = Store.at(args.out, "--out")
        if not args.print_config:
            out.check_writable("--out")
        qwen = fetch_dir(args.qwen, "--qwen")
    except StorageError as e:
        parser.error(str(e))
    if args.print_config:
        from breen.config import BreenConfig

        try:
            config = BreenConfig.from_qwen2_config(json.loads((qwen / "config.json").read_text()), **overrides)
        except (OSError, ValueError) as e:
            parser.error(f"--qwen: {e}")
        print(to_yaml(config.to_dict()), end="")
        return
    import torch

    model = convert_qwen2(qwen, dtype=getattr(torch, args.dtype), seed=args.seed, **overrides)
    with tempfile.TemporaryDirectory(prefix="breen-convert-") as tmp:
        local = Path(out.path) if out.local else Path(tmp)
        model.save_pretrained(local)
        copied = []
        for name in TOKENIZER_FILES:
            if (qwen / name).exists():
                shutil.copy2(qwen / name, local / name)
                copied.append(name)
        if copied:  # processor (re-saves the tokenizer), remote code and auto_map: loadable by transformers
            from transformers import AutoTokenizer

            from breen.hf import save_hf_files

            save_hf_files(local, model.config, AutoTokenizer.from_pretrained(local, config=model.config))
        if not out.local:  # config.json last: a reader that finds it finds the whole directory
            out.upload_dir(local, last=("config.json",))
    print(
        f"BREEN model written to {args.out}: {model.num_params() / 1e9:.3f}B stored, "
        f"{model.num_params(active=True) / 1e9:.3f}B active; tokenizer files: {copied}"
    )


if __name__ == "__main__":
    main()
