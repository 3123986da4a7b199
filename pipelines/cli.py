"""The command line of every step: `python -m pipelines.<step> --config FILE [--set KEY=VALUE ...]`.

`step_main` loads and checks the config, checks the step's inputs (`pipelines.preflight`) before Ray
starts, runs the step and maps its errors to exit codes: 2 for a bad config or a missing input, 3 for a
dataset that another spec, an incomplete upstream, another run's lease or a damaged file stands in the way of.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from breen.lease import LeaseHeld
from pipelines import fingerprint, layout


def step_main(doc: str, run: Callable[[Any], Any], steps: Callable[[Any], Any] | tuple[str, ...],
              argv: list[str] | None = None) -> int:  # fmt: skip
    """Shared CLI for a step: `python -m pipelines.<step> --config FILE [--set key=value ...]` (the
    options of every command: `breen.settings`). The config and the inputs of `steps` (names of
    `pipelines.graph.STEPS`, or a function of the config giving them) are checked before `run` starts
    Ray (`pipelines.preflight`): exit code 2 on a bad one. ``--print-config`` prints the resolved config."""
    import argparse

    from breen.settings import ConfigError, add_config_arguments, sections_help, to_yaml
    from pipelines import preflight
    from pipelines.config import PrepareConfig, load_config

    main_spec = getattr(sys.modules["__main__"], "__spec__", None)
    module = run.__module__ if run.__module__ != "__main__" or main_spec is None else main_spec.name
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config sections and their defaults (--print-config shows a file's resolved values):\n"
        + sections_help(PrepareConfig),
    )  # fmt: skip
    add_config_arguments(parser, "pipeline YAML config (e.g. pipelines/configs/demo.yaml)", required=True)
    parser.add_argument("--redo", action="store_true",
                        help="recompute a dataset made from another config, input or code version (instead of "
                             "refusing it); finished shards of the same spec are still reused")  # fmt: skip
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="when another run is writing a dataset of this step, wait up to SECONDS for it "
                             "(default: fail at once)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        cfg.redo, cfg.wait_s = args.redo, args.wait
        preflight.check(cfg, steps(cfg) if callable(steps) else steps)
        run(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (
        fingerprint.FingerprintMismatch,
        fingerprint.IncompleteUpstream,
        LeaseHeld,
        layout.CorruptShard,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0
