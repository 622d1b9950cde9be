"""What every training command line shares (pre-training's ``objectives/cli.py``, fine-tuning's ``tasks/cli.py``):
the run flags and their overrides, the exit code of a bad configuration, the end-of-run plot."""
from __future__ import annotations

import argparse
from pathlib import Path

EXIT_CONFIG_ERROR = 2


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every training entry point shares (pre-training and fine-tuning), then the overrides."""
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", help="overrides run.output_dir")
    parser.add_argument("--resume", help="'auto' (newest complete checkpoint, else start fresh), a checkpoint "
                        "path, or 'none'")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load the --resume checkpoint even if a file in it needs full unpickling, which can "
                        "run code (sets checkpoint.trust_pickles=true); only for checkpoints you trust")
    parser.add_argument("--report-to", "--report_to", dest="report_to",
                        help="comma-separated: wandb,tensorboard,none (overrides logging.report_to)")
    parser.add_argument("--deepspeed_config", "--ds-config", dest="deepspeed_config",
                        help="DeepSpeed JSON template (zero1, zero2, zero3, zero3_offload, or a path); "
                        "overrides deepspeed.config")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher (LOCAL_RANK is read from the environment)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML config")


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The ``key=value`` overrides: the positional ones, then those the shared flags stand for."""
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    if args.trust_checkpoint:
        overrides.append("checkpoint.trust_pickles=true")
    if args.report_to:
        overrides.append(f"logging.report_to=[{args.report_to}]")
    if args.deepspeed_config:
        overrides.append(f"deepspeed.config={args.deepspeed_config}")
    return overrides


def write_plot(output_dir: Path) -> Path | str:
    """The run's curves (``mplug_ds.engine.plot``); a plotting failure is reported, not fatal (training is done)."""
    from mplug_ds.engine.plot import plot_run

    try:
        return plot_run(output_dir)
    except (OSError, ValueError, ImportError) as err:
        return f"not written ({err}); retry with: python tools/plot_run.py {output_dir}"
