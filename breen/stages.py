"""Which BREEN parameters train in each stage, and the optimizer parameter groups with per-stage learning
rates (reference section 2). Called by the training entrypoints in `jobs/`; no I/O besides the table.

=========  ==========================================================  ===========================
stage      trainable                                                   learning rates
=========  ==========================================================  ===========================
stage1     patch embedding (conv + projector), image experts,          patch_embed 4e-4, rest 4e-5
           image-expert gates, text-expert gates
stage2     everything except the alignment head                        4e-5
stage3     everything except the alignment head                        2e-5
=========  ==========================================================  ===========================

Released-code quirks (named config fields, see `breen.config`): with ``queries_frozen_in_stage1`` the
queries stay frozen in stage 1 (False: they train, at the default rate); with ``align_head_frozen`` the
alignment head is frozen in every stage (False: it trains at the default rate). Embeddings, attention,
norms, text experts and ``lm_head`` are frozen in stage 1 whatever the settings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the stage table and learning rates import no torch (`jobs.config` reads them)
    from breen.config import BreenConfig
    from breen.model import BreenForCausalLM

STAGES = ("stage1", "stage2", "stage3")
# The model's parameter groups ("components", `BreenForCausalLM.component_params`): the unit of the
# trainability tables, learning rates and parameter counts.
COMPONENTS = (
    "patch_embed",
    "queries",
    "align_head",
    "embed_tokens",
    "attention",
    "norms",
    "text_experts",
    "text_gates",
    "image_experts",
    "image_gates",
    "lm_head",
)
DEFAULT_LRS: dict[str, dict[str, float]] = {
    "stage1": {"default": 4e-5, "patch_embed": 4e-4},
    "stage2": {"default": 4e-5},
    "stage3": {"default": 2e-5},
}
_STAGE1 = ("patch_embed", "image_experts", "image_gates", "text_gates")


def trainable_components(config: BreenConfig, stage: str) -> tuple[str, ...]:
    """Components (`COMPONENTS`) that train in `stage` under `config`'s settings."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == "stage1":
        chosen = set(_STAGE1)
        if not config.queries_frozen_in_stage1:
            chosen.add("queries")
    else:
        chosen = set(COMPONENTS) - {"align_head"}
    if not config.align_head_frozen:
        chosen.add("align_head")
    return tuple(c for c in COMPONENTS if c in chosen)


def set_trainable(
    model: BreenForCausalLM, stage: str, log: Callable[[str], None] | None = print
) -> dict[str, tuple[int, int]]:
    """Set ``requires_grad`` for `stage`; log a table; return {component: (trainable, frozen) counts}."""
    from breen.model import param_numel

    chosen = set(trainable_components(model.config, stage))
    counts = {}
    for component, params in model.component_params().items():
        for _, param in params:
            param.requires_grad_(component in chosen)
        n = sum(param_numel(p) for _, p in params)
        counts[component] = (n, 0) if component in chosen else (0, n)
    if log is not None:
        log(format_table(counts, f"BREEN {stage}: trainable / frozen parameters"))
    return counts


def format_table(counts: Mapping[str, tuple[int, int]], title: str) -> str:
    """Plain-text table of trainable / frozen parameter counts per component, with totals."""
    lines = [title, f"{'component':<16}{'trainable':>16}{'frozen':>16}"]
    for component, (trainable, frozen) in counts.items():
        lines.append(f"{component:<16}{trainable:>16,}{frozen:>16,}")
    total_t, total_f = sum(t for t, _ in counts.values()), sum(f for _, f in counts.values())
    lines.append(f"{'total':<16}{total_t:>16,}{total_f:>16,}")
    return "\n".join(lines)


def param_groups(
    model: BreenForCausalLM,
    stage: str,
    lrs: float | Mapping[str, float] | None = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Optimizer parameter groups for the *trainable* parameters, one group per component.

    `lrs`: None (the stage's `DEFAULT_LRS`), one float for every group, or a mapping from component
    names and ``"default"`` to learning rates. Each group has ``params``, ``lr``, ``weight_decay`` (0 in
    the recipe) and ``name`` (the component, for logging).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if lrs is None:
        lrs = DEFAULT_LRS[stage]
    elif isinstance(lrs, (int, float)):
        lrs = {"default": float(lrs)}
    unknown = set(lrs) - set(COMPONENTS) - {"default"}
    if unknown:
        raise ValueError(f"lrs: unknown components {sorted(unknown)}; known: {COMPONENTS} and 'default'")
    groups = []
    for component, params in model.component_params().items():
        trainable = [p for _, p in params if p.requires_grad]
        if not trainable:
            continue
        if component not in lrs and "default" not in lrs:
            raise ValueError(f"lrs: no learning rate for {component!r} and no 'default'")
        lr = lrs.get(component, lrs.get("default"))
        groups.append({"params": trainable, "lr": lr, "weight_decay": weight_decay, "name": component})
    return groups
