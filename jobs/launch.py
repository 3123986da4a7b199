"""The command line of ``python -m jobs.train``: resolve every stage's config, check it, then train.

Reads:  the stage files `jobs/configs/stageN.yaml`, a profile (``--profile``), run files (``--config``),
        ``--set KEY=VALUE`` overrides (`jobs.config`, `breen.settings`), and the flags below.
Writes: nothing itself; `jobs.driver.run_stages` trains the stages (each worker runs `jobs.train`).
        ``--print-config`` prints the resolved config of every stage and exits.

    python -m jobs.train --stage all --config jobs/configs/demo.yaml           # the demo run
    python -m jobs.train --stage stage1 --data /data/shards --init-from /models/breen-7b-init \\
        --set scale.num_workers=8
    python -m jobs.train --stage stage2 --data /data/shards --print-config      # what it would run

``--data``, ``--sft-data``, ``--init-from``, ``--output-dir`` and ``--name`` are shorthands for
``--set data.paths=...`` (stages 1-2 / stage 3), ``model.init_from`` (the first stage run),
``output_dir`` and ``name``. With ``--stage all``, ``--set stage2.KEY=VALUE`` (and a ``stage2:`` section of
a run file) touches one stage. Stage N+1 starts from stage N's export unless its own part of the config
(``stageN.model.init_from``) names a model.
Bare ``KEY=VALUE`` arguments (without ``--set``) are still read in this release, with a deprecation
warning; they go in the next one.

This module imports no torch, Ray or DeepSpeed before the configs are checked (`jobs.driver`, and with it
`jobs.train`, is imported only then): ``--help`` answers at once and a bad value fails in about a second.
"""

from __future__ import annotations

import argparse
import sys

from breen.settings import ConfigError, add_config_arguments, read_yaml, sections_help, to_yaml
from breen.stages import STAGES
from jobs.config import CONFIG_DIR, TrainConfig, build_config, profiles


def split_scoped(overrides: list[str], stage: str) -> list[str]:
    """The overrides for `stage`: unscoped ones and ``stage.KEY=VALUE`` (scope removed), in order."""
    mine = []
    for item in overrides:
        head, _, rest = item.partition(".")
        if head in STAGES and "=" in rest:
            if head == stage:
                mine.append(rest)
        else:
            mine.append(item)
    return mine


def chain_configs(
    stages: list[str],
    *,
    data: list[str],
    sft_data: list[str],
    init_from: str | None,
    output_dir: str | None,
    profile: str,
    overrides: list[str],
    name: str | None = None,
    files: tuple[str, ...] = (),
) -> list[TrainConfig]:
    """Configs for the requested stages: stage file, profile, run `files`, then the flags and
    `overrides` (``stageN.KEY=VALUE`` for one stage). Stage N+1 starts from stage N's export (run alone,
    from ``<output_dir>/<previous stage>/export``) unless its own part of the config names a model
    (`names_own_model`)."""
    cfgs: list[TrainConfig] = []
    for i, stage in enumerate(stages):
        flags = [] if output_dir is None else [f"output_dir={output_dir}"]
        if name and len(stages) == 1:
            flags.append(f"name={name}")
        paths = sft_data if stage == "stage3" else data
        if paths:
            flags.append("data.paths=" + ",".join(paths))
        if i == 0 and init_from is not None:
            flags.append(f"model.init_from={init_from}")
        cfg = build_config(stage, profile, flags + split_scoped(overrides, stage), files)
        if i > 0 and not names_own_model(stage, overrides, files):
            cfg.model.init_from = str(cfgs[-1].export_dir)
        elif cfg.model.init_from is None and stage != STAGES[0]:
            previous = STAGES[STAGES.index(stage) - 1]
            cfg.model.init_from = f"{cfg.output_dir.rstrip('/')}/{previous}/export"  # a path or a URI
        cfgs.append(cfg)
    return cfgs


def names_own_model(stage: str, overrides: list[str], files: tuple[str, ...]) -> bool:
    """Whether `stage`'s own part of the overrides (``stageN.model.init_from=``) or of a run file (its
    ``stageN: {model: {init_from: ...}}``) names the model it starts from; an unscoped ``model.init_from``
    starts only the first stage of a chain."""
    if any(item.startswith(f"{stage}.model.init_from=") for item in overrides):
        return True
    for path in files:
        own = read_yaml(path, CONFIG_DIR).get(stage)
        if isinstance(own, dict) and isinstance(own.get("model"), dict) and "init_from" in own["model"]:
            return True
    return False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train BREEN on Ray Train + DeepSpeed ZeRO-3 (one stage or all three).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config sections and their defaults (each stage file, jobs/configs/stageN.yaml, changes a few; "
        "--print-config shows a stage's resolved values):\n" + sections_help(TrainConfig),
    )
    p.add_argument("--stage", required=True, choices=[*STAGES, "all"])
    add_config_arguments(
        p, "run file laid over the stage files and the profile (e.g. jobs/configs/demo.yaml; repeatable)",
        repeatable=True,
    )
    p.add_argument("--profile", default="cluster",
                   help=f"machine profile, jobs/configs/profiles/NAME.yaml: {', '.join(profiles())} (default: cluster, "
                        "the recipe scale)")  # fmt: skip
    p.add_argument("--data", action="append", default=[], help="training-shard directory (stages 1-2)")
    p.add_argument("--sft-data", action="append", default=[], help="SFT training shards (stage 3)")
    p.add_argument("--init-from", default=None, help="BREEN directory (weights + tokenizer) or 'tiny'")
    p.add_argument("--output-dir", default=None, help="where the runs live (default: output_dir, runs/train)")
    p.add_argument("--name", default=None, help="run name (default: the stage name)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of an embedded local Ray")
    p.add_argument(
        "--allow-config-change", action="store_true",
        help="resume a run although its config changed (the changes are printed and kept in its config history)",
    )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args, bare = ap.parse_known_args(argv)
    bad = [o for o in bare if "=" not in o or o.startswith("-")]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)} (overrides are --set KEY=VALUE)")
    if bare:
        print(f"warning: bare KEY=VALUE arguments are deprecated and go in the next release; write "
              f"{' '.join('--set ' + o for o in bare)}", file=sys.stderr)  # fmt: skip
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    try:
        cfgs = chain_configs(
            stages, data=args.data, sft_data=args.sft_data, init_from=args.init_from, files=tuple(args.config),
            output_dir=args.output_dir, profile=args.profile, overrides=[*bare, *args.set], name=args.name,
        )  # fmt: skip
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print("\n".join(f"# {cfg.stage}\n{to_yaml(cfg)}" for cfg in cfgs), end="")
        return 0

    from jobs import driver  # torch, Ray and DeepSpeed from here on

    try:
        driver.run_stages(cfgs, args.address, args.num_cpus, args.allow_config_change)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except driver.StageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
