"""Command line of ``launch/finetune.py``: task + config → checks → (demo data and checkpoint) → Trainer or evaluation."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import yaml

from mplug_ds.config import ConfigError, config_keys, config_path, format_config_keys, to_dict
from mplug_ds.data.data_config import check_full_batches
from mplug_ds.engine.cli import EXIT_CONFIG_ERROR, add_run_arguments, run_overrides, write_plot
from mplug_ds.engine.validate import validate_engine
from mplug_ds.models.config import ModelConfig, load_model_config
from mplug_ds.runtime import watchdog
from mplug_ds.runtime.atomic import atomic_write_text
from mplug_ds.runtime.failure import exit_hard_on_failure
from mplug_ds.runtime.launch_env import (EXIT_PORT_IN_USE, PortInUseError, WorldInfo, init_distributed,
                                         limit_cpu_threads, start_rank)
from mplug_ds.tasks import TASKS, build_task
from mplug_ds.tasks.checks import check_task_shards
from mplug_ds.tasks.finetune_config import FinetuneConfig, load_finetune_config
from mplug_ds.tasks.pretrained import EXPORT_FILE, check_pretrained, check_task_weights, check_trained
from mplug_ds.tasks.recipe import ResolvedTask, TaskRecipe, resolve_task_shards


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune mPLUG on a task with DeepSpeed. With only --task: the CPU demo (tiny model from the "
                    "demo pre-training checkpoint, made first if missing, on the demo task data).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=config_help())
    parser.add_argument("--task", required=True, help=f"the task: {', '.join(sorted(TASKS))}")
    parser.add_argument("--config", help="task config: a name under mplug_ds/configs/tasks (e.g. grounding_large) "
                        "or a YAML path (default: <task>_demo)")
    parser.add_argument("--pretrained", help="export directory (tools/export_checkpoint.py) or DeepSpeed checkpoint "
                        "directory to start from (default for the demo: the demo pre-training checkpoint)")
    parser.add_argument("--evaluate", action="store_true", help="only evaluate the --pretrained weights")
    add_run_arguments(parser)
    return parser


def config_help() -> str:
    """Every configuration key with its type, built-in default and meaning, generated from the config tree."""
    keys = config_keys(FinetuneConfig) + config_keys(ModelConfig, "model.overrides.", defaults=False)
    return ("Any other argument is a key=value override of the YAML, e.g. batch.micro_batch_per_gpu=32 "
            "eval.every_steps=500 deepspeed.config=zero3.\n"
            "Configuration keys (the --config YAML sets many of them; task.options.* are the task's own: "
            "grounding: loss_weighting; retrieval: queue_size, momentum, alpha, itm_weight, k_test; vqa: mode, "
            "num_beams, min_length, max_length, length_penalty, answer_list, answer_list_size, k_test, "
            "train_scan_samples; caption: num_beams, min_length, max_length, length_penalty, no_repeat_ngram, spice, "
            "train_scan_samples; nlvr2, ve: train_scan_samples):\n"
            + format_config_keys(keys))


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """Load the task YAML and apply the flags and ``key=value`` overrides."""
    build_task(args.task)  # an unknown task name fails here, listing the known ones
    overrides = run_overrides(args)
    if args.pretrained:
        overrides.append(f"task.pretrained={args.pretrained}")
    cfg = load_finetune_config(args.config or f"{args.task}_demo", overrides)
    if cfg.task.name and cfg.task.name != args.task:
        raise ConfigError(f"config '{args.config}' is for task '{cfg.task.name}', not '{args.task}'; pass a "
                          f"{args.task} config (e.g. --config {args.task}_demo)")
    cfg.task.name = args.task
    return cfg


def validate_task(cfg: FinetuneConfig, world_size: int) -> ResolvedTask:
    """Every check that needs no demo data: engine sections, model, task options, --pretrained, shards."""
    engine = validate_engine(cfg, world_size)
    task = build_task(cfg.task.name, cfg.task.options)
    try:
        model = load_model_config(cfg.model.name, cfg.model.override_list())
    except ConfigError as err:
        raise ConfigError(f"model: {err}") from None
    task.check_run(cfg.batch.micro_batch_per_gpu, cfg.batch.micro_batch_per_gpu * world_size)
    if cfg.eval.every_steps < 0 or cfg.eval.batch_size < 1:
        raise ConfigError("eval.every_steps must be >= 0 and eval.batch_size >= 1")
    try:
        check_full_batches(cfg.data.pipeline, "data.pipeline")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.task.pretrained:
        check_pretrained(cfg.task.pretrained, model)
    sources, eval_shards = [], None
    if cfg.data.source == "shards":
        if not cfg.data.pipeline.sources:
            raise ConfigError("data.pipeline.sources is required when data.source=shards, e.g. [{name: refcoco, "
                              "shards: '/data/refcoco/{000000..000012}.tar', manifest: /data/refcoco/manifest.json}]")
        for i, src in enumerate(cfg.data.pipeline.sources):
            check_task_shards(task, src.shards, f"data.pipeline.sources[{i}].shards")
        sources, eval_shards = list(cfg.data.pipeline.sources), cfg.data.eval_shards
        if eval_shards:
            check_task_shards(task, eval_shards, "data.eval_shards")
    return ResolvedTask(ds_config=engine.ds_config, report_to=engine.report_to, model=model, task=task,
                        train_sources=sources, eval_shards=eval_shards)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE",
                "CROSS_RANK", "CROSS_SIZE"):
        env.pop(key, None)
    return env


def demo_pretrain_fingerprint(overrides: Sequence[str]) -> str:
    """12 hex digits of the demo pre-training's recipe: its pre-training and model configs and ``overrides``."""
    digest = hashlib.sha1()
    for path in (config_path("pretrain", "demo"), config_path("models", "demo")):
        digest.update(path.read_bytes())
    digest.update("\0".join(overrides).encode())
    return digest.hexdigest()[:12]


def ensure_demo_pretrained(cfg: FinetuneConfig) -> Path:
    """The demo pre-training checkpoint (an export under ``<cache_dir>/world-*/pretrained-<recipe>``); made first if
    missing by running the demo pre-training (``launch/pretrain.py``) in one process and exporting its last
    checkpoint."""
    from mplug_ds.engine.export import export_checkpoint

    from mplug_ds.data.demo_shards import world_dir

    cache = Path(cfg.data.cache_dir).expanduser()
    recipe = demo_pretrain_fingerprint(cfg.task.demo_pretrain)  # a changed demo recipe trains a new checkpoint
    export = world_dir(cache) / f"pretrained-{recipe}"  # a checkpoint of this demo world and recipe
    if (export / EXPORT_FILE).is_file():
        return export
    run_dir = world_dir(cache) / f"pretrain_run-{recipe}"
    print(f"no demo pre-training checkpoint in {export}: running the demo pre-training first ({run_dir})", flush=True)
    code = "import sys; from mplug_ds.objectives.cli import main; sys.exit(main())"
    # One process with ZeRO kept: DeepSpeed's zero_to_fp32 (the export) cannot read a stage-0 checkpoint.
    command = [sys.executable, "-c", code, "--config", "demo", "--output-dir", str(run_dir), "--resume", "auto",
               f"data.cache_dir={cache}", "deepspeed.zero_on_one_rank=true", *cfg.task.demo_pretrain]
    if subprocess.run(command, env=_child_env()).returncode != 0:
        raise RuntimeError(f"the demo pre-training failed (its output is above; run directory {run_dir})")
    export_checkpoint(run_dir, export)
    return export


def prepare_demo(cfg: FinetuneConfig, resolved: ResolvedTask, world: WorldInfo) -> None:
    """Demo runs: rank 0 prepares the task shards and the pre-training checkpoint; every rank learns the outcome."""
    import torch.distributed as dist

    init_distributed(cfg.run.collective_timeout_s)
    outcome: list = [None]
    if world.rank == 0:
        try:
            pretrained = cfg.task.pretrained or str(ensure_demo_pretrained(cfg))
            sources, eval_shards = resolve_task_shards(cfg, resolved.task)
            outcome = [{"pretrained": pretrained, "sources": sources, "eval_shards": eval_shards}]
        except Exception as err:  # every rank must learn that preparation failed, then exit
            outcome = [{"error": f"{type(err).__name__}: {err}"}]
    if world.world_size > 1:
        dist.broadcast_object_list(outcome, src=0)
    result = outcome[0]
    if "error" in result:
        raise RuntimeError(f"preparing the demo failed on rank 0: {result['error']}")
    cfg.task.pretrained = result["pretrained"]
    resolved.train_sources, resolved.eval_shards = result["sources"], result["eval_shards"]
    check_pretrained(cfg.task.pretrained, resolved.model)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        world = start_rank(args.local_rank)
    except PortInUseError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_PORT_IN_USE
    try:
        cfg = config_from_args(args)
        resolved = validate_task(cfg, world.world_size)
        limit_cpu_threads(cfg.run.cpu_threads)
        if args.evaluate and not cfg.task.pretrained and cfg.data.source != "demo":
            raise ConfigError("--evaluate needs --pretrained (the weights to evaluate)")
        if args.evaluate and cfg.task.pretrained:
            check_task_weights(cfg.task.pretrained, cfg.task.name, resolved.task.head_prefixes)
            check_trained(cfg.task.pretrained, cfg.task.name, resolved.task.uses)
        if cfg.data.source == "demo":
            prepare_demo(cfg, resolved, world)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.evaluate:
        with exit_hard_on_failure(world.rank):
            return evaluate_only(cfg, resolved, world)
    return train(cfg, resolved, world)


def train(cfg: FinetuneConfig, resolved: ResolvedTask, world: WorldInfo) -> int:
    from mplug_ds.engine.trainer import Trainer

    holder: list[TaskRecipe] = []

    def make_recipe(w: WorldInfo) -> TaskRecipe:
        holder.append(TaskRecipe(cfg, resolved, w))
        return holder[0]

    with exit_hard_on_failure(world.rank):
        summary = Trainer(cfg, resolved, world, make_recipe).train()
    recipe = holder[0]
    if world.rank == 0:
        last = recipe.last_eval
        if last is not None and last.metrics:
            print(format_result(cfg, resolved, last.metrics, last.baseline, last.picture), flush=True)
        else:
            print(f"\nno evaluation (stopped at step {summary.steps}; continue with --resume auto)", flush=True)
        print(f"checkpoint: {summary.checkpoint}\nmetrics: {cfg.output_dir}/metrics.jsonl\n"
              f"plot: {write_plot(cfg.output_dir)}", flush=True)
    return 0


def evaluate_only(cfg: FinetuneConfig, resolved: ResolvedTask, world: WorldInfo) -> int:
    """Evaluate ``task.pretrained`` (no training): every sample once over all ranks; rank 0 reports."""
    from deepspeed.accelerator import get_accelerator

    from mplug_ds.models.mplug import build_model
    from mplug_ds.tasks.evaluation import run_evaluation
    from mplug_ds.tasks.pretrained import load_pretrained, load_task_weights
    from mplug_ds.tasks.recipe import task_data_config

    init_distributed(cfg.run.collective_timeout_s)
    accel = get_accelerator()
    device = torch.device(accel.device_name(world.local_rank) if accel.device_name() == "cuda" else "cpu")
    model = build_model(resolved.model)
    report = load_pretrained(model, cfg.task.pretrained)
    module = resolved.task.build(model).to(device)
    head = load_task_weights(module, cfg.task.pretrained, resolved.task.name, resolved.task.head_prefixes)
    data = task_data_config(cfg, resolved.model, resolved.task, False, resolved.train_sources)
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    results = out / "eval" / "evaluate.json"
    if world.rank == 0:  # the settings it ran with, beside its results (mplug_ds.load(..., config=…) repeats them)
        results.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(results.with_suffix(".config.yaml"), yaml.safe_dump(to_dict(cfg), sort_keys=False))
    dog = watchdog.HangWatchdog(out, world, cfg.run.hang_timeout_s,
                                watchdog.LONG_FRACTION * cfg.run.collective_timeout_s).start()
    watchdog.phase("evaluation", 0)
    result = run_evaluation(resolved.task, module, resolved.eval_shards, data, cfg.eval.batch_size,
                            cfg.eval.max_samples, device, results if world.rank == 0 else None)
    dog.stop()
    if world.rank == 0:
        print(report.format() + (f"\nloaded {head} tensors of the task head" if head else ""), flush=True)
        record = {"event": "eval", "time": time.time(), "checkpoint": cfg.task.pretrained, **result.metrics,
                  **{f"baseline/{k}": v for k, v in result.baseline.items()}}
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(format_result(cfg, resolved, result.metrics, result.baseline, result.picture), flush=True)
    return 0


def format_result(cfg: FinetuneConfig, resolved: ResolvedTask, metrics: dict, baseline: dict,
                  picture: Path | None = None) -> str:
    """The end-of-run report: every metric, then the primary metric beside its baseline, and where the results
    and the picture of the first predictions are."""
    task = resolved.task
    lines = ["", f"=== {task.name} evaluation ==="]
    lines += [f"{k}: {v:.4f}" for k, v in metrics.items() if not k.startswith("baseline/")]
    lines += [f"baseline {k}: {v:.4f}" for k, v in baseline.items()]
    lines.append(task.format_metric(metrics, baseline))
    lines.append(f"results: {cfg.output_dir}/eval/")
    if picture is not None:
        lines.append(f"predictions: {picture}")
    return "\n".join(lines)
