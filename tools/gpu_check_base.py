"""What every step of ``tools/gpu_check.py`` shares: the modes (sizes), the step record, the context, and the
helpers that build a real Trainer and tear it down.

Each step is a function ``step(ctx, rec)`` that records named checks (passed, failed, or skipped with a reason)
and figures in ``rec``; an exception fails the step. ``quick`` and ``full`` use the real models on one GPU, ``cpu``
the ``tiny`` model on the same code paths (checks that need CUDA are recorded as skipped, with the reason).
"""
from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mplug_ds.engine.trainer import Trainer
from mplug_ds.objectives.pretrain_config import load_train_config, validate
from mplug_ds.objectives.timix_recipe import pretrain_recipe
from mplug_ds.runtime.launch_env import WorldInfo

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Mode:
    """Sizes of one run: which models, how many steps, how large the loader benchmark is."""

    name: str
    device: str  # "cuda" or "cpu"
    correctness_model: str
    kernel_model: str
    models: dict[str, tuple[str, int]]  # throughput slot -> (model config, ZeRO stage)
    probe_batches: dict[str, tuple[int, int]]  # slot -> two micro-batches whose peak memory gives the fit
    fixed_batch: int | None  # CPU: no device memory to fill, every measurement uses this micro-batch
    correctness_batch: int  # micro-batch of the correctness steps
    precision: str  # of the checkpointing, kernel and throughput runs (correctness.bf16 is bf16 everywhere)
    warmup: int
    steps: int
    loader_batches: int
    loader_batch_size: int
    loader_res: int
    loader_per_shard: int


GPU_MODELS = {"base": ("mplug.en.base", 2), "large": ("mplug.en.large", 2), "huge": ("mplug.en.huge", 3)}
GPU_PROBES = {"base": (16, 32), "large": (16, 32), "huge": (8, 16)}
MODES = {
    "quick": Mode(name="quick", device="cuda", correctness_model="tiny", kernel_model="mplug.en.base",
                  models=GPU_MODELS, probe_batches=GPU_PROBES, fixed_batch=None, correctness_batch=4,
                  precision="bf16", warmup=3, steps=5, loader_batches=20, loader_batch_size=64, loader_res=256,
                  loader_per_shard=64),
    "full": Mode(name="full", device="cuda", correctness_model="tiny", kernel_model="mplug.en.base",
                 models=GPU_MODELS, probe_batches=GPU_PROBES, fixed_batch=None, correctness_batch=4,
                 precision="bf16", warmup=5, steps=20, loader_batches=50, loader_batch_size=64, loader_res=256,
                 loader_per_shard=128),
    # The same steps at tiny sizes; fp32 but for correctness.bf16 (a CPU without a bf16 matrix unit runs bf16 ~2x
    # slower).
    "cpu": Mode(name="cpu", device="cpu", correctness_model="tiny", kernel_model="tiny",
                models={"base": ("tiny", 2), "large": ("tiny", 2), "huge": ("tiny", 3)}, probe_batches={},
                fixed_batch=2, correctness_batch=2, precision="fp32", warmup=0, steps=1, loader_batches=2,
                loader_batch_size=8, loader_res=64, loader_per_shard=16),
}


class CheckFailed(AssertionError):
    """A check that the rest of its step depends on failed."""


@dataclass
class StepRecord:
    """What one step found: named checks, figures and a one-line summary."""

    checks: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    skipped: bool = False  # the step's purpose cannot be checked here (``skip_step``)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        """Record a check that passed or failed; returns ``ok``."""
        self.checks.append({"name": name, "status": "passed" if ok else "failed", "detail": detail})
        return ok

    def require(self, name: str, ok: bool, detail: str = "") -> None:
        """``check``, and stop the step when it failed."""
        if not self.check(name, ok, detail):
            raise CheckFailed(f"{name}: {detail}")

    def skip(self, name: str, reason: str) -> None:
        """Record a check this run cannot make, and why."""
        self.checks.append({"name": name, "status": "skipped", "detail": reason})

    def skip_step(self, name: str, reason: str) -> None:
        """Record that the step's main check cannot be made here (the step is reported as skipped)."""
        self.skip(name, reason)
        self.skipped = True
        self.summary = f"skipped: {reason.split(';')[0]}"

    @property
    def status(self) -> str:
        if any(c["status"] == "failed" for c in self.checks):
            return "failed"
        return "skipped" if self.skipped else "passed"


@dataclass
class Context:
    """What every step may use: the mode, this process's world and device, scratch space, earlier results."""

    mode: Mode
    world: WorldInfo
    device: torch.device
    scratch: Path
    earlier: dict[str, dict[str, Any]]  # figures of the steps already run in this check, by step name
    kit: Path | None

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.on_cuda:
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- helpers
def release_memory() -> None:
    """Free what the previous engine left (cached CUDA blocks included)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def built_trainer(ctx: Context, name: str, overrides: list[str]) -> Iterator[Trainer]:
    """A real Trainer (DeepSpeed engine, recipe, synthetic stream) for the correctness checks; torn down after."""
    cfg = load_train_config("synthetic_tiny", [
        f"model.name={ctx.mode.correctness_model}", f"batch.micro_batch_per_gpu={ctx.mode.correctness_batch}",
        "schedule.alpha_warmup_steps=0", "logging.progress_bar=false", "logging.report_to=[none]",
        "logging.every_steps=1000", f"run.output_dir={ctx.scratch / name}", *overrides])
    resolved = validate(cfg, ctx.world.world_size)
    built = Trainer(cfg, resolved, ctx.world, pretrain_recipe(cfg, resolved))
    try:
        yield built
    finally:
        built.logger.close()
        built.engine.destroy()
        del built  # this frame's reference, before collecting
        release_memory()


def device_batch(tr: Trainer, index: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic batch ``index`` of the trainer's stream, on its device."""
    return {k: v.to(tr.engine.device) for k, v in tr.stream.batch(index).items()}
