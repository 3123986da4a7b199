"""Hugging Face hand-off: the Auto-class registration of `import breen`, and what an export needs so that
transformers alone (``trust_remote_code=True``, no `breen` package) loads it.

Registration. `import breen` calls `install()`, which costs no torch or transformers import: ``AutoConfig``
"breen" -> `BreenConfig`, ``AutoModelForCausalLM`` -> `BreenForCausalLM` and ``AutoProcessor`` ->
`BreenProcessor` are registered when transformers' auto modules are imported, or at once if they already
are. Each Auto class is registered the moment both its module
(``transformers.models.auto.{configuration,modeling,processing}_auto``) and the breen module it maps to
have finished loading, through a post-import hook on ``sys.meta_path`` (`_PAIRS`).

Remote code. `save_hf_files(directory, config, tokenizer)` writes the processor (`BreenProcessor`:
``processor_config.json`` + tokenizer files) and then `write_remote_code(directory)`: the package's own
modules copied under transformers' names (`REMOTE_MODULES`), their ``from breen.X import`` lines rewritten
to relative imports (transformers loads remote code as a package and copies only files reached through
relative imports), and ``auto_map`` (`AUTO_MAP`) added to ``config.json`` and ``processor_config.json``.
The copies are generated at every export, never edited by hand. ``jobs.checkpoint`` (stage exports) and
``breen.convert`` call it.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2 ms): `import breen` runs this module
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import ModuleType
    from typing import Any

# package module -> file name in the export (transformers' naming: configuration_*, modeling_*, processing_*)
REMOTE_MODULES = {
    "breen.config": "configuration_breen",
    "breen.geometry": "geometry_breen",  # CLIP normalisation and the resize rule (imported by breen.config)
    "breen.attention": "attention_breen",
    "breen.model": "modeling_breen",
    "breen.stages": "stages_breen",  # the parameter groups (COMPONENTS) the model is built around
    "breen.data": "data_breen",
    "breen.processing": "processing_breen",
}
AUTO_MAP = {
    "AutoConfig": "configuration_breen.BreenConfig",
    "AutoModelForCausalLM": "modeling_breen.BreenForCausalLM",
    "AutoProcessor": "processing_breen.BreenProcessor",
}
_AUTO = "transformers.models.auto."


# ----------------------------------------------------------------------------- registration
def _register_config(module: ModuleType) -> None:
    from breen.config import BreenConfig

    module.AutoConfig.register(BreenConfig.model_type, BreenConfig, exist_ok=True)


def _register_model(module: ModuleType) -> None:
    from breen.config import BreenConfig
    from breen.model import BreenForCausalLM

    module.AutoModelForCausalLM.register(BreenConfig, BreenForCausalLM, exist_ok=True)


def _register_processor(module: ModuleType) -> None:
    from breen.config import BreenConfig
    from breen.processing import BreenProcessor

    module.AutoProcessor.register(BreenConfig, BreenProcessor, exist_ok=True)


# (transformers auto module, breen module, registration): run once both modules have finished loading
_PAIRS: tuple[tuple[str, str, Callable[[ModuleType], None]], ...] = (
    (_AUTO + "configuration_auto", "breen.config", _register_config),
    (_AUTO + "modeling_auto", "breen.model", _register_model),
    (_AUTO + "processing_auto", "breen.processing", _register_processor),
)
_WATCHED = {name for pair in _PAIRS for name in pair[:2]}
_running: set[str] = set()  # watched modules whose code is executing now


def _on_loaded(name: str) -> None:
    """A watched module finished loading: register every pair whose transformers module is ready.

    A pair whose breen module is still executing waits for it: ``breen.model`` imports transformers
    modules that import ``modeling_auto``, so that one finishes first, and the pair is registered when
    ``breen.model`` itself finishes.
    """
    for auto, own, register in _PAIRS:
        if name in (auto, own) and auto in sys.modules and not {auto, own} & _running:
            register(sys.modules[auto])


class _RegisterAfterImport:
    """Meta-path finder: lets the other finders locate a watched module, and wraps its loader so that
    `_on_loaded` runs after it (importlib's protocols, without importing ``importlib.abc``)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Wrapped(spec.loader)
                return spec
        return None


class _Wrapped:
    def __init__(self, loader: Any):
        self.loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        _running.add(module.__name__)
        try:
            self.loader.exec_module(module)
        finally:
            _running.discard(module.__name__)
        _on_loaded(module.__name__)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ...: the real loader's
        return getattr(self.loader, name)


def install() -> None:
    """Register BREEN with the Auto classes whose modules are loaded, and hook the others (idempotent)."""
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
    for auto, _, register in _PAIRS:
        if auto in sys.modules:
            register(sys.modules[auto])


# ----------------------------------------------------------------------------- export files
def remote_source(module_name: str) -> str:
    """Source of one package module with its ``from breen.X import`` lines made relative."""
    import importlib.util
    import re
    from pathlib import Path

    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find the source of {module_name}")
    text = Path(spec.origin).read_text(encoding="utf-8")

    def relative(match: re.Match) -> str:
        target = match.group(2)
        if target not in REMOTE_MODULES:
            raise ValueError(
                f"{module_name} imports {target}, which the export does not carry (REMOTE_MODULES)"
            )
        return f"{match.group(1)}from .{REMOTE_MODULES[target]} import "

    text = re.sub(r"^(\s*)from (breen\.\w+) import ", relative, text, flags=re.MULTILINE)
    if re.search(r"^\s*(import breen|from breen\b)", text, flags=re.MULTILINE):
        raise ValueError(f"{module_name} has a `breen` import that cannot be made relative")
    header = f"# Generated from {module_name} by breen.hf.write_remote_code at export time: do not edit.\n"
    return header + text


def write_remote_code(directory: str | Path) -> list[Path]:
    """Write the remote-code modules into ``directory`` and add `AUTO_MAP` to its JSON files."""
    from pathlib import Path

    directory = Path(directory)
    written = []
    for module_name, file_name in REMOTE_MODULES.items():
        path = directory / f"{file_name}.py"
        path.write_text(remote_source(module_name), encoding="utf-8")
        written.append(path)
    _add_auto_map(directory / "config.json", AUTO_MAP)
    _add_auto_map(directory / "processor_config.json", {"AutoProcessor": AUTO_MAP["AutoProcessor"]})
    return written


def _add_auto_map(path: Path, auto_map: dict[str, str]) -> None:
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    data["auto_map"] = {**data.get("auto_map", {}), **auto_map}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_hf_files(directory: str | Path, config: Any, tokenizer: Any) -> None:
    """Processor (with the tokenizer) and remote code, next to a saved model's ``config.json``."""
    from breen.processing import BreenProcessor

    BreenProcessor(tokenizer, config=config).save_pretrained(directory)
    write_remote_code(directory)
