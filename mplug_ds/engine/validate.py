"""Check the engine sections of a run config before any process starts work; every failure is a ``ConfigError``.

A run's own sections are checked by its validation (``objectives/pretrain_config.py``, ``tasks/cli.py``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mplug_ds.config import ConfigError
from mplug_ds.engine.checkpoint import CheckpointLayout, checkpoint_layout, resolve_resume
from mplug_ds.engine.ds_config import build_ds_config, zero_stage
from mplug_ds.engine.logging import check_report_to
from mplug_ds.engine.train_config import EngineConfig


@dataclass
class ResolvedEngine:
    """What validating the engine sections produced: the DeepSpeed config and the metric sinks."""

    ds_config: dict[str, Any]
    report_to: list[str]


def resolve_batch(cfg: EngineConfig, world_size: int) -> None:
    """Check the batch geometry; ``batch.global_batch_size`` (if set) decides the accumulation steps."""
    b = cfg.batch
    for key in ("micro_batch_per_gpu", "grad_accum_steps"):
        if getattr(b, key) < 1:
            raise ConfigError(f"batch.{key} must be >= 1, got {getattr(b, key)}")
    if b.micro_batch_per_gpu < 2:
        raise ConfigError("batch.micro_batch_per_gpu must be >= 2 (ITM draws in-batch negatives on each rank)")
    if b.global_batch_size is None:
        return
    per_step = b.micro_batch_per_gpu * world_size
    if b.global_batch_size % per_step:
        raise ConfigError(
            f"batch.global_batch_size={b.global_batch_size} is not divisible by batch.micro_batch_per_gpu "
            f"({b.micro_batch_per_gpu}) × {world_size} ranks = {per_step}; choose a multiple of {per_step} "
            f"(e.g. {per_step * max(1, round(b.global_batch_size / per_step))})")
    accum = b.global_batch_size // per_step
    if b.grad_accum_steps not in (1, accum):
        raise ConfigError(
            f"batch.grad_accum_steps={b.grad_accum_steps} disagrees with batch.global_batch_size="
            f"{b.global_batch_size} (which needs {accum} with {world_size} ranks); set only one of them")
    b.grad_accum_steps = accum


def _number(key: str, value: float, minimum: float, inclusive: bool = True) -> None:
    """A finite number at or above (``inclusive``) / above ``minimum``."""
    low_ok = value >= minimum if inclusive else value > minimum
    if not (math.isfinite(value) and low_ok):
        raise ConfigError(f"{key} must be a finite number {'>=' if inclusive else '>'} {minimum:g}, got {value}")


def check_hang_settings(cfg: EngineConfig) -> None:
    """``run.hang_timeout_s`` fires before the backend's own time-out (which would end the ranks without a report,
    NCCL by aborting them); the divergence check runs every >= 1 steps."""
    r = cfg.run
    _number("run.hang_timeout_s", r.hang_timeout_s, minimum=0.0)
    if r.hang_timeout_s >= r.collective_timeout_s:
        raise ConfigError(f"run.hang_timeout_s={r.hang_timeout_s:g} must be below run.collective_timeout_s="
                          f"{r.collective_timeout_s:g}: the backend's time-out would end the ranks first, without a "
                          "hang report; lower it or raise run.collective_timeout_s (0: automatic)")
    if r.check_every_steps < 1:
        raise ConfigError(f"run.check_every_steps must be >= 1, got {r.check_every_steps}")


def check_output_dir(path: Path) -> None:
    """The output directory exists as a writable directory, or can be created (checked without creating it)."""
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"run.output_dir: cannot create {path}: {existing} is a file, not a directory; "
                          "choose another --output-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.output_dir: cannot write to {existing} (permission denied), so {path} cannot be "
                          "created or written; choose a writable --output-dir")


def check_resume(cfg: EngineConfig) -> None:
    """``run.resume`` is none/auto or names a complete checkpoint (a typo like 'autoo' is not taken as a path)."""
    spec = cfg.run.resume
    if spec in (None, "none", "auto"):
        return
    try:
        resolve_resume(spec, cfg.checkpoint_dir)
    except FileNotFoundError as err:
        hint = "" if Path(spec).expanduser().exists() else (
            f"; {spec} does not exist. Use --resume auto (newest checkpoint of run.output_dir), --resume none, or "
            "the path of a run, its checkpoints/ directory or one step_XXXXXXXX directory")
        raise ConfigError(f"run.resume: {err}{hint}") from None


def resume_layout(cfg: EngineConfig) -> CheckpointLayout | None:
    """The layout of the checkpoint ``run.resume`` will load (``None`` for a fresh start)."""
    try:
        tag_dir = resolve_resume(cfg.run.resume, cfg.checkpoint_dir)
    except FileNotFoundError:
        return None  # reported by check_resume
    return checkpoint_layout(tag_dir) if tag_dir is not None else None


def keep_global_batch(cfg: EngineConfig, source: CheckpointLayout, world_size: int) -> None:
    """Resuming on another number of ranks keeps the checkpoint's global batch (accumulation is re-derived) unless
    ``batch.global_batch_size`` is set."""
    b = cfg.batch
    if b.global_batch_size is not None or source.global_batch is None:
        return
    per_step = b.micro_batch_per_gpu * world_size
    if source.global_batch % per_step:
        raise ConfigError(
            f"run.resume: the checkpoint was written by {source.world_size} ranks with a global batch of "
            f"{source.global_batch} samples, which batch.micro_batch_per_gpu={b.micro_batch_per_gpu} × {world_size} "
            f"ranks = {per_step} does not divide; choose a micro-batch that divides it over {world_size} ranks, or "
            "set batch.global_batch_size to change the global batch")
    b.global_batch_size = source.global_batch


def validate_engine(cfg: EngineConfig, world_size: int) -> ResolvedEngine:
    """Validate the sections every run shares; fills derived values (accumulation steps) into ``cfg``.

    A resume on another number of ranks than the checkpoint's keeps its global batch and ZeRO stage and loads it as a
    DeepSpeed universal checkpoint (``checkpoint.load_universal``).
    """
    check_resume(cfg)
    source = resume_layout(cfg)
    resharded = source is not None and source.world_size != world_size
    if resharded:
        if source.zero_stage == 0:
            raise ConfigError(
                f"run.resume: the checkpoint was written by {source.world_size} rank(s) without ZeRO (stage 0, the "
                f"default on one rank) and this run has {world_size} ranks; DeepSpeed's universal checkpoint needs "
                f"ZeRO's partitioned optimizer files. Resume it on {source.world_size} rank(s), or export the weights "
                "(tools/export_checkpoint.py) and start from them with model.init_from; one-rank runs that may grow "
                "later should set deepspeed.zero_on_one_rank=true")
        keep_global_batch(cfg, source, world_size)
    resolve_batch(cfg, world_size)
    s = cfg.schedule
    if s.total_steps < 1:
        raise ConfigError(f"schedule.total_steps must be >= 1, got {s.total_steps}")
    if not 0 <= s.warmup_steps <= s.total_steps:
        raise ConfigError(f"schedule.warmup_steps={s.warmup_steps} must be between 0 and schedule.total_steps "
                          f"({s.total_steps})")
    if s.alpha_warmup_steps < 0:
        raise ConfigError("schedule.alpha_warmup_steps must be >= 0")
    for key in ("warmup_lr", "min_lr"):
        _number(f"schedule.{key}", getattr(s, key), minimum=0.0)
    o = cfg.optim
    for key in ("lr", "visual_lr", "eps"):
        _number(f"optim.{key}", getattr(o, key), minimum=0.0, inclusive=False)
    _number("optim.weight_decay", o.weight_decay, minimum=0.0)
    _number("optim.grad_clip", o.grad_clip, minimum=0.0)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    if cfg.checkpoint.every_steps < 1 or cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.every_steps and checkpoint.keep_last must be >= 1")
    for key, value in (("run.max_nonfinite_steps", cfg.run.max_nonfinite_steps),
                       ("logging.every_steps", cfg.logging.every_steps)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    _number("run.collective_timeout_s", cfg.run.collective_timeout_s, minimum=0.0, inclusive=False)
    check_hang_settings(cfg)
    check_output_dir(cfg.output_dir)
    if cfg.run.cpu_threads < 0:
        raise ConfigError(f"run.cpu_threads must be >= 0 (0: torch's default), got {cfg.run.cpu_threads}")
    if cfg.deepspeed.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("deepspeed.precision=fp16 needs a CUDA device (DeepSpeed has no fp16 on CPU); "
                          "use bf16 or fp32")
    report_to = check_report_to(cfg.logging.report_to)
    ds_config = build_ds_config(cfg, world_size, keep_zero=source is not None and source.zero_stage > 0)
    if resharded:
        if zero_stage(ds_config) == 0:
            raise ConfigError(f"run.resume: the checkpoint was written under ZeRO-{source.zero_stage} by "
                              f"{source.world_size} ranks; resuming it on {world_size} needs a ZeRO config "
                              "(deepspeed.config=zero1/zero2/zero3)")
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return ResolvedEngine(ds_config=ds_config, report_to=report_to)
