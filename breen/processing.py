"""`BreenProcessor`: tokenizer + BREEN image preprocessing + the stage-3 prompt layout, for transformers.

What `AutoProcessor.from_pretrained(export)` returns. Reads a BREEN directory (``config.json`` for the image
geometry and query count, the tokenizer files); writes ``processor_config.json`` and the tokenizer files
(`save_pretrained`). ``processor(text=question, images=image)`` returns exactly what
`breen.data.encode_prompt` returns (``input_ids`` with image/query sentinels, ``pixel_values`` uint8
[3, S, S] canvas, ``image_grid``), with a batch dimension of one, plus an all-ones ``attention_mask``:
the inputs of `BreenForCausalLM.forward` and ``model.generate``. The layout (system turn, ``<image>`` turn,
query block, the question repeated, ``<|im_start|>assistant\\n``) is `breen.data`'s, applied in token
space because the sentinels are not tokens a chat template could emit; this module only wraps it.

Used as::

    processor = AutoProcessor.from_pretrained(export)          # after `import breen`, or trust_remote_code
    inputs = processor(text="What is in the image?", images=Image.open("cat.jpg"))

The export copies this file as ``processing_breen.py`` (`breen.hf.write_remote_code`), so it imports only
`breen.config`, `breen.data` and transformers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin

from breen.config import BreenConfig
from breen.data import encode_prompt


class BreenProcessor(ProcessorMixin):
    """Wraps a Qwen2 tokenizer and the `BreenConfig` whose image geometry it applies.

    The config is not saved in ``processor_config.json``: it is the export's ``config.json`` (one owner of
    the image size, patch size, normalisation and query count), read again by `from_pretrained`.
    """

    def __init__(
        self, tokenizer: Any = None, config: BreenConfig | None = None, chat_template: str | None = None
    ):
        if config is None:
            raise ValueError("BreenProcessor needs the model's BreenConfig (image geometry, query count)")
        self.config = config
        super().__init__(tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> BreenProcessor:
        """Tokenizer and config from one BREEN directory (``trust_remote_code`` and hub kwargs accepted)."""
        kwargs.pop("trust_remote_code", None)
        config = BreenConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
        # the config is passed so that no AutoConfig lookup of "breen" happens inside AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
        return cls(tokenizer, config=config)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("config", None)  # it lives in config.json
        return out

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        system: str | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """One prompt -> model inputs [1, ...] (`breen.data.encode_prompt`, plus ``attention_mask``).

        ``text``: the user question (a ``<image>`` placeholder in it is dropped: the image always comes
        first). ``images``: one PIL image or encoded image bytes, or None for a text-only prompt. A list of
        one is accepted for either; larger batches are refused (prompts of different lengths would need
        left padding, which the model's generation path does not use: call once per prompt).
        """
        if kwargs:
            raise TypeError(f"BreenProcessor got unexpected arguments: {sorted(kwargs)}")
        text, images = _one(text, "text"), _one(images, "images")
        if not isinstance(text, str):
            raise TypeError(f"text must be a string (the question), got {type(text).__name__}")
        inputs = encode_prompt(self.tokenizer, self.config, question=text, image=images, system=system)
        batch = {key: value[None] for key, value in inputs.items()}  # batch of one
        batch["attention_mask"] = np.ones_like(batch["input_ids"])
        return BatchFeature(batch, tensor_type=return_tensors)


def _one(value: Any, name: str) -> Any:
    """``value``, or its only element when it is a list or tuple of one."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"BreenProcessor handles one prompt at a time; got {len(value)} {name}")
        return value[0]
    return value
