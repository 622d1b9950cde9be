"""Command line of ``launch/pretrain.py``: arguments → validated ``TrainConfig`` → ``Trainer`` → summary."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from mplug_ds.config import ConfigError, config_keys, format_config_keys
from mplug_ds.engine.cli import EXIT_CONFIG_ERROR, add_run_arguments, run_overrides, write_plot
from mplug_ds.engine.data_health import format_skipped
from mplug_ds.models.config import ModelConfig
from mplug_ds.objectives.pretrain_config import ResolvedRun, TrainConfig, load_train_config, validate
from mplug_ds.runtime.failure import exit_hard_on_failure, hard_exit
from mplug_ds.runtime.launch_env import (EXIT_PORT_IN_USE, PortInUseError, WorldInfo, limit_cpu_threads,
                                         start_rank)

if TYPE_CHECKING:
    from mplug_ds.engine.trainer import RunSummary


def build_parser() -> argparse.ArgumentParser:
    """Arguments shared by every launcher (deepspeed, torchrun, srun, plain python)."""
    parser = argparse.ArgumentParser(
        description="mPLUG pre-training on DeepSpeed. With no arguments: the CPU demo (tiny model, demo data).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=config_help())
    parser.add_argument("--config", default="demo", help="pre-training config: a name under "
                        "mplug_ds/configs/pretrain (demo, base, large) or a YAML path (default: demo)")
    add_run_arguments(parser)
    return parser


def config_help() -> str:
    """Every configuration key with its type, built-in default and meaning, generated from the config tree."""
    keys = config_keys(TrainConfig) + config_keys(ModelConfig, "model.overrides.", defaults=False)
    return ("Any other argument is a key=value override of the YAML, e.g. batch.micro_batch_per_gpu=32 "
            "deepspeed.config=zero3 schedule.total_steps=20000.\n"
            "Configuration keys (defaults are the built-in ones; the --config YAML sets many of them; "
            "model.overrides.* default to the named model's values):\n" + format_config_keys(keys))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Load the YAML and apply the flags and ``key=value`` overrides."""
    overrides = run_overrides(args)
    return load_train_config(args.config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 also after a SIGTERM-triggered checkpoint)."""
    args = build_parser().parse_intermixed_args(argv)
    try:
        world = start_rank(args.local_rank)
    except PortInUseError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_PORT_IN_USE
    try:
        cfg = config_from_args(args)
        resolved = validate(cfg, world.world_size)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return run(cfg, resolved, world)


def run(cfg: TrainConfig, resolved: ResolvedRun, world: WorldInfo) -> int:
    """Train and print the summary on rank 0; any failure ends this rank at once with status 1."""
    from mplug_ds.engine.trainer import Trainer
    from mplug_ds.objectives.timix_recipe import pretrain_recipe

    limit_cpu_threads(cfg.run.cpu_threads)
    with exit_hard_on_failure(world.rank):
        summary = Trainer(cfg, resolved, world, pretrain_recipe(cfg, resolved)).train()
    if world.rank == 0:
        print(format_summary(summary, write_plot(cfg.output_dir)), flush=True)
    return 0


def format_summary(summary: RunSummary, plot: Path | str | None = None) -> str:
    """The end-of-run report: losses first -> last per objective, retrieval beside chance, throughput, outputs."""
    lines = ["", "=== pre-training summary ===", f"steps: {summary.steps}"]
    if summary.losses:
        lines.append("losses (mean of the first -> last steps):")
    for key, (first, last) in summary.losses.items():
        name = "total" if key == "loss" else key.removeprefix("loss_")
        lines.append(f"  {name:<7} {first:8.4f} -> {last:8.4f}")
    if summary.retrieval:
        r = summary.retrieval
        lines.append(f"zero-shot retrieval on the held-out split ({int(r['num_images'])} images, "
                     f"{int(r['num_texts'])} captions), chance in brackets:")
        for k in (1, 5):
            lines.append(f"  R@{k}  image->text {r[f'i2t_r{k}']:.3f} (chance {r[f'i2t_r{k}_chance']:.3f})   "
                         f"text->image {r[f't2i_r{k}']:.3f} (chance {r[f't2i_r{k}_chance']:.3f})")
    if summary.samples_per_s is not None:
        lines.append(f"throughput: {summary.samples_per_s:.1f} samples/s (all ranks, training steps)")
    if summary.skipped_samples:
        lines.append(f"samples skipped (corrupt, unreadable or oversized; skipped/read per source): "
                     f"{format_skipped(summary.skipped_samples)}")
    lines += summary.warnings
    if summary.skipped_batches:
        lines.append(f"batches skipped for non-finite loss: {summary.skipped_batches}")
    if summary.stopped_by_signal:
        lines.append("stopped by signal before the last step; resume with --resume auto")
    lines.append(f"checkpoint: {summary.checkpoint}")
    lines.append(f"metrics: {summary.output_dir}/metrics.jsonl")
    pictures = sorted((Path(summary.output_dir) / "eval").glob("retrieval_step_*.png"))  # the last evaluation's
    if summary.retrieval and pictures:
        lines.append(f"retrieval picture: {pictures[-1]}")
    if plot is not None:
        lines.append(f"plot: {plot}")
    return "\n".join(lines)


def entry() -> None:
    """The ``mplug-pretrain`` console script: ``main`` and then an immediate exit (see ``runtime.failure``)."""
    hard_exit(main())
