"""The steps of ``tools/gpu_check.py``, run by its worker process (``python tools/gpu_check_steps.py ...``).

Each step is a function ``step(ctx, rec)`` that records named checks (passed, failed, or skipped with a reason)
and figures in ``rec``; an exception fails the step. The worker runs the steps it is given in order and appends
one JSON line per event to the events file: ``{"event": "start", "step": ...}`` before a step and the step's
result after it. After a step raised, the worker exits (status 3) so the next step starts in a fresh process
(a CUDA error or a fragmented allocator does not carry over); ``tools/gpu_check.py`` restarts it, enforces each
step's time-out and writes the report.

Sizes come from the mode: ``quick`` and ``full`` use the real models on one GPU, ``cpu`` the ``tiny`` model on
the same code paths (checks that need CUDA are recorded as skipped, with the reason).
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import benchmark
import benchmark_data
import mplug_ds
from mplug_ds.data.collate import collate_caption
from mplug_ds.engine.trainer import Trainer
from mplug_ds.models.config import load_model_config
from mplug_ds.models.mplug import build_model
from mplug_ds.objectives.pretrain import PretrainConfig, PretrainModel
from mplug_ds.objectives.pretrain_config import load_train_config, validate
from mplug_ds.objectives.timix_recipe import pretrain_recipe
from mplug_ds.runtime.atomic import atomic_write_text
from mplug_ds.runtime.guards import StopRequest
from mplug_ds.runtime.launch_env import WorldInfo, prepare_world_env
from mplug_ds.runtime.master_weights import full_fp32_param

TOOLS = Path(__file__).resolve().parent
FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
MEMORY_HEADROOM = 0.85  # share of the device's memory a planned micro-batch may fill (allocator slack, fragments)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TEST_MOMENTUM = 0.5  # the correctness runs' EMA factor: far from 1, so an EMA of the bf16 copy would show
MFU_TARGET = 0.40  # issue 23: mplug.en.base at ≥ 40% MFU (goal 45%)
TIMIX_RATIO_TARGET = 1.35  # docs/PERFORMANCE.md: TiMix step / plain step for mplug.en.base


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
    "quick": Mode("quick", "cuda", "tiny", "mplug.en.base", GPU_MODELS, GPU_PROBES, None, 4, "bf16", warmup=3, steps=5,
                  loader_batches=20, loader_batch_size=64, loader_res=256, loader_per_shard=64),
    "full": Mode("full", "cuda", "tiny", "mplug.en.base", GPU_MODELS, GPU_PROBES, None, 4, "bf16", warmup=5, steps=20,
                 loader_batches=50, loader_batch_size=64, loader_res=256, loader_per_shard=128),
    "cpu": Mode("cpu", "cpu", "tiny", "tiny", {"base": ("tiny", 2), "large": ("tiny", 2), "huge": ("tiny", 3)},
                {}, 2, 2, "fp32", warmup=0, steps=1, loader_batches=2, loader_batch_size=8, loader_res=64, loader_per_shard=16),
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
        del built
        release_memory()


def device_batch(tr: Trainer, index: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic batch ``index`` of the trainer's stream, on its device."""
    return {k: v.to(tr.engine.device) for k, v in tr.stream.batch(index).items()}


def inner_optimizer(optimizer: Any) -> Any:
    """The client optimizer inside DeepSpeed's wrappers (ZeRO, loss scaling)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def padded_caption_batch(batch_size: int, image_size: int, max_len: int) -> dict[str, torch.Tensor]:
    """A pre-training batch whose captions have different lengths, so text, prefix and target are padded."""
    words = "a small red square and a large blue circle next to a green triangle on a striped wooden table".split()
    gen = torch.Generator().manual_seed(0)
    items = []
    for row in range(batch_size):
        n = 3 + (row * 5) % max(1, max_len - 5)
        caption = words[:n]
        cut = max(1, n // 2)
        items.append({"key": f"padded-{row}", "image": torch.rand(3, image_size, image_size, generator=gen) * 2 - 1,
                      "text": " ".join(caption), "prefix": " ".join(caption[:cut]),
                      "target": " ".join(caption[cut:]) + " [SEP]"})
    batch = dict(collate_caption(items, max_len))
    del batch["keys"]
    return batch


def sdpa_kernels_used(prof: profile) -> dict[str, int]:
    """Calls of each scaled-dot-product-attention kernel (forward and backward) seen by the profiler."""
    return {e.key.removeprefix("aten::"): e.count for e in prof.key_averages()
            if e.key.startswith("aten::_scaled_dot_product") or e.key.startswith("aten::_efficient_attention")
            or e.key.startswith("aten::_flash_attention") or e.key.startswith("aten::_cudnn_attention")}


def version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


NOT_CARRIED = {"pycocoevalcap"}  # caption metrics: not used by this check, left out of the carry kit


def unmet_requirements() -> list[str]:
    """mplug_ds's install requirements that the installed packages miss or do not satisfy (``NOT_CARRIED`` aside)."""
    from packaging.requirements import Requirement

    unmet = []
    for line in importlib.metadata.requires("mplug_ds") or []:
        req = Requirement(line)
        if req.name in NOT_CARRIED or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        installed = version_of(req.name)
        if installed is None:
            unmet.append(f"{req.name} is not installed")
        elif not req.specifier.contains(installed, prereleases=True):
            unmet.append(f"{req.name} {installed} does not satisfy '{req}'")
    return unmet


def median_seconds(fn: Callable[[], Any], sync: Callable[[], None], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` (synchronised before and after each call)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- (a) environment
def environment(ctx: Context, rec: StepRecord) -> None:
    """Versions, the device, bf16 support, and the device's measured matmul and copy ceilings."""
    from deepspeed.accelerator import get_accelerator

    versions = {name: version_of(name) for name in ("torch", "deepspeed", "timm", "transformers", "tokenizers",
                                                    "webdataset", "pydantic", "torchvision", "numpy", "mplug_ds")}
    rec.figures.update(python=platform.python_version(), versions=versions, cpu_count=os.cpu_count(),
                       mplug_ds_path=str(Path(mplug_ds.__file__).parent),
                       torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if ctx.on_cuda else None)
    if ctx.kit is not None and (ctx.kit / "BUILD_INFO.json").exists():
        rec.figures["kit"] = json.loads((ctx.kit / "BUILD_INFO.json").read_text())
    unmet = unmet_requirements()
    rec.check("the installed packages satisfy mplug_ds's requirements", not unmet, "; ".join(unmet) or
              f"all but {', '.join(sorted(NOT_CARRIED))} (not needed here)")
    if Path("/dev/shm").exists():  # the loader's workers hand batches over through it
        rec.figures["dev_shm_gib"] = round(shutil.disk_usage("/dev/shm").total / 2**30, 1)
    accelerator = get_accelerator().device_name()
    rec.check("DeepSpeed's accelerator is this run's device", accelerator == ctx.device.type,
              f"DeepSpeed chose '{accelerator}', the run needs '{ctx.device.type}'")
    if ctx.on_cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        rec.figures.update(device=props.name, capability=f"{props.major}.{props.minor}",
                           memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
        rec.check("bf16 supported", torch.cuda.is_bf16_supported(), f"capability {props.major}.{props.minor}")
        smi = shutil.which("nvidia-smi")
        if smi:
            query = "name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu"
            out = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30, check=False)
            rec.figures["nvidia_smi"] = dict(zip(query.split(","), (v.strip() for v in out.stdout.split(","))))
        n, dtype, copy_bytes = 8192, torch.bfloat16, 2**30
    else:
        rec.figures["device"] = platform.processor() or "cpu"
        rec.skip("bf16 supported", "--cpu: bf16 tensor cores are a GPU check")
        n, dtype, copy_bytes = 512, torch.float32, 2**26
    a, b = (torch.randn(n, n, device=ctx.device, dtype=dtype) for _ in range(2))
    seconds = median_seconds(lambda: a @ b, ctx.sync, repeats=10 if ctx.on_cuda else 3)
    rec.figures["matmul_tflops"] = round(2 * n ** 3 / seconds / 1e12, 3)
    src = torch.randn(copy_bytes // 4, device=ctx.device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), ctx.sync, repeats=10 if ctx.on_cuda else 3)
    rec.figures["copy_tb_per_s"] = round(2 * copy_bytes / seconds / 1e12, 3)  # bytes read + bytes written
    v = versions
    rec.summary = (f"{rec.figures['device']}; torch {v['torch']} (CUDA {torch.version.cuda}), DeepSpeed "
                   f"{v['deepspeed']}; {'x'.join([str(n)] * 3)} {str(dtype).removeprefix('torch.')} matmul "
                   f"{rec.figures['matmul_tflops']} TFLOP/s, copy {rec.figures['copy_tb_per_s']} TB/s")


# ---------------------------------------------------------------------------------------------- (b) correctness
def precision_steps(ctx: Context, rec: StepRecord, precision: str, max_steps: int) -> None:
    """One pre-training step (up to ``max_steps`` under fp16 until one is applied) on ZeRO-1, 2 and 3.

    Checks per stage: the engine's stage, the module's compute dtype, the fused AdamW inside DeepSpeed, a finite
    loss, an applied step, and the momentum teacher: fp32, on the device, moved exactly by the EMA of the fp32
    master weights (untouched by a step skipped for overflow). Across stages: the same first loss.
    """
    dtype = DTYPES[precision]
    first_loss = {}
    for stage in (1, 2, 3):
        overrides = [f"deepspeed.config=zero{stage}", f"deepspeed.precision={precision}",
                     "deepspeed.zero_on_one_rank=true", f"objective.momentum={TEST_MOMENTUM}"]
        with built_trainer(ctx, f"{precision}-zero{stage}", overrides) as tr:
            engine, teacher = tr.engine, tr.recipe.teacher
            tag = f"ZeRO-{stage} {precision}"
            rec.check(f"{tag}: engine runs stage {stage}", engine.zero_optimization_stage() == stage,
                      f"stage {engine.zero_optimization_stage()}")
            dtypes = sorted({str(p.dtype) for p in tr.recipe.module.parameters()})
            rec.check(f"{tag}: the module computes in {precision}", dtypes == [str(dtype)], ", ".join(dtypes))
            inner = inner_optimizer(engine.optimizer)
            rec.check(f"{tag}: DeepSpeed steps the fused AdamW", isinstance(inner, torch.optim.AdamW)
                      and bool(inner.defaults.get("fused")), type(inner).__name__)
            data = iter(tr.stream)
            stop = StopRequest()
            applied, losses, scales, moved_on_skip = False, [], [], []
            try:
                for _ in range(max_steps):
                    before = [p_m.detach().clone() for _, p_m, _ in teacher.pairs]
                    tr.optimizer_step(data, stop)
                    losses.append(tr.losses[-1]["loss"])
                    scales.append(getattr(engine.optimizer, "loss_scale", None))
                    if engine.was_step_applied():
                        applied = True
                        break
                    moved_on_skip.append(any(not torch.equal(b, p_m) for b, (_, p_m, _) in zip(before, teacher.pairs)))
            finally:
                stop.restore()
            if moved_on_skip:
                rec.check(f"{tag}: steps skipped for overflow leave the teacher alone", not any(moved_on_skip),
                          f"{len(moved_on_skip)} skipped step(s)")
            rec.check(f"{tag}: losses finite, a step applied", applied and all(map(math.isfinite, losses)),
                      f"losses {[round(x, 4) for x in losses]}" + (f", loss scales {scales}" if precision == "fp16" else ""))
            if precision == "fp16":
                rec.check(f"{tag}: dynamic loss scaling", all(isinstance(s, (int, float)) and s > 0 for s in scales),
                          f"loss scales {scales}")
            teacher_dtypes = {p_m.dtype for _, p_m, _ in teacher.pairs}
            teacher_devices = {p_m.device.type for _, p_m, _ in teacher.pairs}
            rec.check(f"{tag}: the momentum teacher is fp32 on the {ctx.device.type}",
                      teacher_dtypes == {torch.float32} and teacher_devices == {ctx.device.type},
                      f"{teacher_dtypes}, {teacher_devices}")
            if applied:
                m = teacher.momentum
                worst = max(float((p_m - b.lerp(full_fp32_param(p).to(b.device).view_as(b), 1 - m)).abs().max())
                            for b, (_, p_m, p) in zip(before, teacher.pairs))
                rec.check(f"{tag}: the teacher moved by the EMA of the fp32 master weights", worst <= 1e-6,
                          f"largest deviation {worst:.2e}")
            first_loss[stage] = losses[0]
    spread = max(relative_difference(first_loss[1], first_loss[s]) for s in (2, 3))
    rec.check(f"ZeRO-1/2/3 give the same first loss ({precision} tolerance 1e-2)", spread <= 1e-2,
              f"losses {[round(first_loss[s], 5) for s in (1, 2, 3)]}, relative spread {spread:.1e}")
    rec.figures["first_loss"] = first_loss
    rec.summary = f"{precision} first losses (ZeRO-1/2/3): " + " / ".join(f"{first_loss[s]:.4f}" for s in (1, 2, 3))


def correctness_bf16(ctx: Context, rec: StepRecord) -> None:
    """A bf16 pre-training step on ZeRO-1/2/3 (one device), the teacher fp32."""
    precision_steps(ctx, rec, "bf16", max_steps=1)


def correctness_fp16(ctx: Context, rec: StepRecord) -> None:
    """An fp16 (dynamically loss-scaled) step on ZeRO-1/2/3; CUDA only."""
    if not ctx.on_cuda:
        rec.skip_step("fp16 (loss-scaled) step on ZeRO-1/2/3",
                      "needs CUDA; DeepSpeed has no fp16 on CPU (validation refuses deepspeed.precision=fp16 there)")
        return
    precision_steps(ctx, rec, "fp16", max_steps=12)  # the scale starts at 2^16 and halves on overflows


def loss_and_grads(tr: Trainer, batch: dict[str, torch.Tensor], seed: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One forward and backward of the engine on ``batch`` (RNG seeded): losses and each parameter's full grad."""
    from deepspeed.utils import safe_get_full_grad

    torch.manual_seed(seed)
    out = tr.engine(batch, **tr.recipe.step_args(0))
    tr.engine.backward(out["loss"])
    grads = {name: safe_get_full_grad(p).detach().float().cpu().clone()
             for name, p in tr.recipe.module.named_parameters() if p.requires_grad}
    return {k: float(out[k]) for k in tr.recipe.loss_keys}, grads


def correctness_grad_checkpointing(ctx: Context, rec: StepRecord) -> None:
    """Activation checkpointing on and off give the same losses and gradients (the mode's precision: bf16 on a GPU;
    same weights, batch and RNG)."""
    runs = {}
    for ckpt in (False, True):
        with built_trainer(ctx, f"ckpt-{ckpt}", [f"deepspeed.precision={ctx.mode.precision}",
                                           f"model.overrides.grad_checkpointing={str(ckpt).lower()}"]) as tr:
            runs[ckpt] = loss_and_grads(tr, device_batch(tr), seed=1234)
    (loss_off, grads_off), (loss_on, grads_on) = runs[False], runs[True]
    loss_gap = max(relative_difference(loss_off[k], loss_on[k]) for k in loss_off)
    rec.check("same losses (bf16 tolerance 1e-2)", loss_gap <= 1e-2,
              f"loss {loss_off['loss']:.5f} vs {loss_on['loss']:.5f}; largest relative gap {loss_gap:.1e}")
    off, on = (torch.cat([g[n].flatten() for n in sorted(grads_off)]) for g in (grads_off, grads_on))
    gap = float((on - off).norm() / off.norm().clamp_min(1e-12))
    worst = max(sorted(grads_off), key=lambda n: float((grads_on[n] - grads_off[n]).norm()
                                                        / grads_off[n].norm().clamp_min(1e-12)))
    rec.check("same gradients (bf16 tolerance: relative L2 gap ≤ 2e-2)", gap <= 2e-2,
              f"relative L2 gap {gap:.1e} over {off.numel()} values (largest in {worst})")
    rec.figures.update(loss_gap=loss_gap, grad_gap=gap)
    rec.summary = f"checkpointing on/off: loss gap {loss_gap:.1e}, gradient gap {gap:.1e}"


REFERENCE_OVERRIDES = [  # the random parts of the objective (MLM masking, ITM negatives, dropout) left out
    "deepspeed.precision=fp32", "objective.itm_weight=0", "objective.mlm_weight=0",
    "model.overrides.text.hidden_dropout=0", "model.overrides.text.attn_dropout=0"]
REFERENCE_STEPS = 2


def reference_step(ctx: Context) -> dict[str, Any]:
    """A fixed-seed fp32 run of two optimizer steps on the engine: losses, and the first step's gradients
    summarised (global norm, per-tensor norms, projections on fixed random directions) to compare across devices.

    ITM negatives and MLM masks are drawn from the device's generator and differ between CPU and CUDA, so
    their losses are weighted 0 and dropout is off: what remains (ITA with distillation, prefix LM) is
    deterministic given the weights. TF32 is off on CUDA.
    """
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with built_trainer(ctx, f"reference-{ctx.device.type}", REFERENCE_OVERRIDES) as tr:
            losses, summary = [], {}
            for index in range(REFERENCE_STEPS):
                step_losses, grads = loss_and_grads(tr, device_batch(tr, index), seed=99 + index)
                losses.append({k: step_losses[k] for k in ("loss", "loss_ita", "loss_prefix")})
                if index == 0:
                    flat = torch.cat([grads[n].flatten() for n in sorted(grads)]).double()
                    directions = torch.randn(4, flat.numel(), generator=torch.Generator().manual_seed(0),
                                             dtype=torch.float64)
                    summary = {"norm": float(flat.norm()), "projections": (directions @ flat).tolist(),
                               "tensor_norms": {n: float(grads[n].norm()) for n in sorted(grads)}}
                tr.engine.step()
            return {"device": ctx.device.type, "losses": losses, "grads": summary}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def cpu_reference_step(ctx: Context) -> dict[str, Any]:
    """``reference_step`` in a separate process that sees no GPU (DeepSpeed then runs on the CPU accelerator)."""
    out = ctx.scratch / "cpu_reference.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run([sys.executable, __file__, "--reference-step", str(out), "--mode", ctx.mode.name,
                    "--scratch", str(ctx.scratch / "cpu")], env=env, check=True, timeout=600)
    return json.loads(out.read_text())


def compare_reference(rec: StepRecord, cuda: dict[str, Any], cpu: dict[str, Any]) -> None:
    """Checks that the CUDA reference run equals the CPU one within fp32 tolerances."""
    first = max(relative_difference(cuda["losses"][0][k], cpu["losses"][0][k]) for k in cpu["losses"][0])
    rec.check("first-step losses equal (fp32, relative 1e-4)", first <= 1e-4, f"largest relative gap {first:.1e}")
    g_cuda, g_cpu = cuda["grads"], cpu["grads"]
    norm_gap = relative_difference(g_cuda["norm"], g_cpu["norm"])
    projection_gap = max(abs(a - b) for a, b in zip(g_cuda["projections"], g_cpu["projections"])) / g_cpu["norm"]
    tensor_gap = max(abs(g_cuda["tensor_norms"][n] - v) for n, v in g_cpu["tensor_norms"].items()) / g_cpu["norm"]
    rec.check("first-step gradients equal (fp32, relative 1e-4 of the gradient norm)",
              max(norm_gap, projection_gap, tensor_gap) <= 1e-4,
              f"norm {norm_gap:.1e}, random projections {projection_gap:.1e}, per-tensor norms {tensor_gap:.1e}")
    later = max(relative_difference(a[k], b[k]) for a, b in zip(cuda["losses"][1:], cpu["losses"][1:]) for k in a)
    rec.check("losses after AdamW updates equal (fp32, relative 1e-3)", later <= 1e-3,
              f"largest relative gap {later:.1e}")
    rec.figures.update(first_loss_gap=first, grad_gap=max(norm_gap, projection_gap, tensor_gap), later_loss_gap=later)


def correctness_cuda_vs_cpu(ctx: Context, rec: StepRecord) -> None:
    """The CUDA result of a fixed-seed fp32 step equals the CPU result."""
    here = reference_step(ctx)
    finite = all(math.isfinite(v) for row in here["losses"] for v in row.values())
    rec.require(f"fp32 reference run on the {ctx.device.type} is finite", finite, str(here["losses"][0]))
    rec.figures[ctx.device.type] = here
    if not ctx.on_cuda:
        rec.skip_step("the CUDA fp32 step equals the CPU step", "needs CUDA; the CPU reference run itself ran: first "
                      f"loss {here['losses'][0]['loss']:.6f}, gradient norm {here['grads']['norm']:.6f}")
        return
    cpu = cpu_reference_step(ctx)
    rec.figures["cpu"] = cpu
    compare_reference(rec, here, cpu)
    rec.summary = (f"CUDA vs CPU fp32: first loss gap {rec.figures['first_loss_gap']:.1e}, gradient gap "
                   f"{rec.figures['grad_gap']:.1e}, after-step loss gap {rec.figures['later_loss_gap']:.1e}")


# ---------------------------------------------------------------------------------------------- (c) kernels
def sdpa_dispatch(ctx: Context, rec: StepRecord) -> list[str]:
    """The pre-training forward and backward of the kernel model (bf16 on a GPU) on padded captions: the sdpa kernels
    PyTorch's default dispatch picks (profiled), then the same with only fused backends allowed. Returns the fused
    kernels seen."""
    model_cfg = load_model_config(ctx.mode.kernel_model)
    module = PretrainModel(build_model(model_cfg), PretrainConfig())
    dtype = DTYPES[ctx.mode.precision]
    module.to(device=ctx.device, dtype=dtype)
    module.teacher.to(ctx.device)
    # CUDA: training mode, attention dropout included. PyTorch's CPU flash kernel has no dropout, so on CPU the
    # same forward runs without it.
    module.train(ctx.on_cuda)
    batch = {k: v.to(ctx.device) for k, v in padded_caption_batch(4, model_cfg.vision.image_size, 30).items()}
    batch["image"] = batch["image"].to(dtype)
    rec.require("the text batch is padded", bool((batch["text_mask"] == 0).any()),
                f"text lengths {batch['text_mask'].sum(1).tolist()} of {batch['text_mask'].shape[1]}")

    def whole_step() -> None:
        module.zero_grad(set_to_none=True)
        module(batch, alpha=0.4)["loss"].backward()

    def vit_only() -> None:
        module.zero_grad(set_to_none=True)
        module.model.encode_image(batch["image"]).float().square().mean().backward()

    def runs_with(backends: list[SDPBackend], fn: Callable[[], None]) -> tuple[bool, str]:
        try:
            with sdpa_kernel(backends):
                fn()
                ctx.sync()
        except RuntimeError as err:
            return False, str(err).strip().splitlines()[0][:300]
        return True, "ran"

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        whole_step()
        ctx.sync()
    used = sdpa_kernels_used(prof)
    rec.figures["sdpa_kernels_default_dispatch"] = used
    rec.check("default dispatch: no attention call falls back to the math kernel",
              bool(used) and not any("math" in k for k in used),
              ", ".join(f"{k}×{n}" for k, n in sorted(used.items())) or "no sdpa call seen")
    ok, detail = runs_with([SDPBackend.FLASH_ATTENTION], vit_only)
    rec.check(f"ViT attention (no mask) runs with only the flash kernel allowed ({model_cfg.name})", ok, detail)
    ok, detail = runs_with(FUSED_SDPA, whole_step)
    rec.check("the whole step's attention (padded text, cross-attention, causal decoder) runs with only fused "
              "kernels allowed (flash, memory-efficient, cuDNN; no math)", ok, detail)
    if not ctx.on_cuda:
        rec.skip("fused kernels with attention dropout (training mode)",
                 "CUDA-only: PyTorch's CPU flash kernel has no dropout, so the CPU run checks without it")
    return sorted(k for k in used if "math" not in k)


def fused_optimizer(ctx: Context, rec: StepRecord) -> None:
    """A DeepSpeed optimizer step (bf16 on a GPU, as in training) runs torch's fused AdamW kernel (profiled)."""
    with built_trainer(ctx, "kernels-optimizer", [f"deepspeed.precision={ctx.mode.precision}"]) as tr:
        loss_and_grads(tr, device_batch(tr), seed=0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:  # the optimizer step alone
            tr.engine.step()
            ctx.sync()
    adam = sorted({e.key for e in prof.key_averages() if "adam" in e.key.lower() and e.key.startswith("aten::")})
    rec.check("DeepSpeed's step runs torch's fused AdamW kernel (aten::_fused_adamw_)", "aten::_fused_adamw_" in adam,
              ", ".join(adam) or "no AdamW kernel seen")


def kernels(ctx: Context, rec: StepRecord) -> None:
    """``sdpa`` reaches the fused kernels (ViT without a mask; padded text with key masks, the causal decoder),
    asserted through PyTorch's backend selection and seen in the profiler; DeepSpeed steps the fused AdamW."""
    fused = sdpa_dispatch(ctx, rec)
    release_memory()
    fused_optimizer(ctx, rec)
    rec.summary = f"{ctx.mode.kernel_model}: sdpa kernels {', '.join(fused) or 'none'}; fused AdamW"


# ---------------------------------------------------------------------------------------------- (d) throughput
def fit_micro_batch(points: list[tuple[int, float]], capacity_gib: float, multiple: int = 8, limit: int = 512) -> int:
    """The largest micro-batch whose peak memory, extrapolated linearly from two measured (batch, peak GiB) points,
    stays within ``capacity_gib``; a multiple of ``multiple`` (when at least that), between the smaller probe and
    ``limit``."""
    (b1, p1), (b2, p2) = sorted(points)
    slope = (p2 - p1) / (b2 - b1)
    if slope <= 0:  # no growth measured: nothing to extrapolate from
        return b2
    fit = int((capacity_gib - (p1 - slope * b1)) / slope)
    if fit >= multiple:
        fit -= fit % multiple
    return max(b1, min(limit, fit))


def measure(ctx: Context, model: str, zero: int, batch: int, attn: str = "sdpa", ckpt: bool = False,
            timix: bool = False, warmup: int | None = None, steps: int | None = None) -> dict[str, Any]:
    """``tools/benchmark.py``'s measurement of the trainer's step for one configuration."""
    argv = ["--model", model, "--zero", str(zero), "--batch", str(batch), "--attn", attn,
            "--warmup", str(ctx.mode.warmup if warmup is None else warmup),
            "--steps", str(ctx.mode.steps if steps is None else steps),
            "--precision", ctx.mode.precision, *(["--grad-checkpointing"] if ckpt else [])]
    args = benchmark.parse_args(argv)
    out = tempfile.mkdtemp(prefix="bench-", dir=ctx.scratch)
    try:
        return benchmark.measure(args, attn, ctx.world, out, timix)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        release_memory()


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def measure_fitting(ctx: Context, rec: StepRecord, model: str, zero: int, batch: int, tries: int = 3,
                    **kwargs: Any) -> dict[str, Any]:
    """``measure`` at ``batch``; after running out of device memory, again at 3/4 of it (``tries`` in all)."""
    for attempt in range(tries):
        try:
            return measure(ctx, model, zero, batch, **kwargs)
        except RuntimeError as err:
            if not is_out_of_memory(err) or attempt == tries - 1:
                raise
        release_memory()
        smaller = max(1, batch * 3 // 4)
        rec.figures.setdefault("out_of_memory", []).append({"batch": batch, "retried_at": smaller, **kwargs})
        batch = smaller
    raise AssertionError("unreachable")


def largest_micro_batch(ctx: Context, rec: StepRecord, slot: str, ckpt: bool = False) -> int:
    """The micro-batch the throughput runs of ``slot`` use: on a GPU, a quick search (two short probe runs, a linear
    fit of their peak memory, ``MEMORY_HEADROOM`` of the device); on the CPU, the mode's fixed batch.

    The memory planner (tools/plan.py, in progress) replaces the probes when it lands: same inputs, same result.
    """
    model, zero = ctx.mode.models[slot]
    if ctx.mode.fixed_batch is not None:
        rec.skip(f"largest micro-batch search for {model}",
                 f"CPU: no device memory to fill; every measurement uses micro-batch {ctx.mode.fixed_batch}")
        return ctx.mode.fixed_batch
    capacity = torch.cuda.get_device_properties(ctx.device).total_memory / 2**30 * MEMORY_HEADROOM
    points = []
    for probe in ctx.mode.probe_batches[slot]:
        result = measure(ctx, model, zero, probe, ckpt=ckpt, warmup=1, steps=1)
        points.append((probe, result["peak_memory_gb"]))
    batch = fit_micro_batch(points, capacity)
    rec.figures["micro_batch_search"] = {"probes": points, "capacity_gib": round(capacity, 1), "chosen": batch}
    return batch


def throughput_line(result: dict[str, Any]) -> str:
    mfu = f"{100 * result['mfu']:.1f}% MFU" if result["mfu"] is not None else "no MFU (no known peak)"
    return f"{result['samples_per_s']:.1f} samples/s at batch {result['batch_per_device']}, {mfu}"


def mfu_target(ctx: Context, rec: StepRecord, result: dict[str, Any]) -> None:
    if result["mfu"] is None:
        reason = "CPU: MFU is measured against a GPU's bf16 peak" if not ctx.on_cuda else \
            f"no known bf16 peak for '{result['device']}' (mplug_ds/engine/flops.py PEAK_TFLOPS)"
        rec.skip(f"target: MFU ≥ {MFU_TARGET:.0%}", reason)
        return
    rec.check(f"target: MFU ≥ {MFU_TARGET:.0%} (issue 23; goal 45%)", result["mfu"] >= MFU_TARGET,
              f"{100 * result['mfu']:.1f}%")


def throughput_base(ctx: Context, rec: StepRecord) -> None:
    """mplug.en.base (256 px; bf16 on a GPU) at the largest micro-batch: sdpa, and eager attention as the baseline."""
    model, zero = ctx.mode.models["base"]
    batch = largest_micro_batch(ctx, rec, "base")
    sdpa = measure_fitting(ctx, rec, model, zero, batch, attn="sdpa")
    eager = measure_fitting(ctx, rec, model, zero, sdpa["batch_per_device"], attn="eager")
    rec.figures.update(micro_batch=sdpa["batch_per_device"], runs=[sdpa, eager],
                       sdpa_vs_eager=sdpa["samples_per_s"] / eager["samples_per_s"])
    rec.check("the timed steps ran without skipped batches", sdpa["skipped_batches"] == 0 == eager["skipped_batches"])
    mfu_target(ctx, rec, sdpa)
    rec.summary = f"{model} sdpa: {throughput_line(sdpa)}; eager {rec.figures['sdpa_vs_eager']:.2f}x slower"


def base_batch(ctx: Context, rec: StepRecord) -> int:
    """The micro-batch ``throughput.base`` chose (searched again when that step did not finish)."""
    earlier = ctx.earlier.get("throughput.base", {})
    return earlier.get("micro_batch") or largest_micro_batch(ctx, rec, "base")


def base_sdpa_run(ctx: Context, batch: int) -> dict[str, Any] | None:
    """``throughput.base``'s sdpa measurement when it ran at ``batch``."""
    runs = ctx.earlier.get("throughput.base", {}).get("runs") or []
    return next((r for r in runs if r["attn"] == "sdpa" and r["batch_per_device"] == batch), None)


def throughput_base_checkpointing(ctx: Context, rec: StepRecord) -> None:
    """mplug.en.base with activation checkpointing on, against off, at the same micro-batch."""
    model, zero = ctx.mode.models["base"]
    batch = base_batch(ctx, rec)
    on = measure_fitting(ctx, rec, model, zero, batch, ckpt=True)
    off = base_sdpa_run(ctx, on["batch_per_device"]) or measure(ctx, model, zero, on["batch_per_device"])
    rec.figures.update(runs=[on, off], step_time_ratio=on["step_time_s"] / off["step_time_s"],
                       memory_ratio=on["peak_memory_gb"] / max(off["peak_memory_gb"], 1e-9))
    rec.summary = (f"checkpointing on: {rec.figures['step_time_ratio']:.2f}x step time, "
                   f"{rec.figures['memory_ratio']:.2f}x peak memory (batch {on['batch_per_device']})")


def throughput_base_timix(ctx: Context, rec: StepRecord) -> None:
    """The TiMix step against the plain step for mplug.en.base at the same micro-batch."""
    model, zero = ctx.mode.models["base"]
    timix = measure_fitting(ctx, rec, model, zero, base_batch(ctx, rec), timix=True)
    batch = timix["batch_per_device"]
    plain = base_sdpa_run(ctx, batch) or measure(ctx, model, zero, batch)
    ratio = timix["step_time_s"] / plain["step_time_s"]
    rec.figures.update(runs=[timix, plain], step_time_ratio=ratio)
    if ctx.on_cuda:
        rec.check(f"target: TiMix step / plain step ≤ {TIMIX_RATIO_TARGET} (docs/PERFORMANCE.md)",
                  ratio <= TIMIX_RATIO_TARGET, f"{ratio:.2f}x")
    else:
        rec.skip(f"target: TiMix step / plain step ≤ {TIMIX_RATIO_TARGET}", "CPU timings are no performance claim")
    rec.summary = f"TiMix / plain step time {ratio:.2f}x at batch {batch}"


def throughput_model(slot: str) -> Callable[[Context, StepRecord], None]:
    """The throughput step of a larger model: sdpa at its largest micro-batch."""
    def step(ctx: Context, rec: StepRecord) -> None:
        model, zero = ctx.mode.models[slot]
        result = measure_fitting(ctx, rec, model, zero, largest_micro_batch(ctx, rec, slot))
        rec.figures.update(micro_batch=result["batch_per_device"], runs=[result])
        rec.summary = f"{model} ZeRO-{zero}: {throughput_line(result)}"
    step.__doc__ = f"mplug.en.{slot} (bf16 on a GPU) at its largest micro-batch"
    return step


# ---------------------------------------------------------------------------------------------- (e) loader
def loader(ctx: Context, rec: StepRecord) -> None:
    """``tools/benchmark_data.py`` on every core: decode + augment images/s, against the base step's need."""
    workers = os.cpu_count() or 1
    m = ctx.mode
    shards_dir = ctx.scratch / "loader"
    shards_dir.mkdir(parents=True, exist_ok=True)
    shards = benchmark_data.write_synthetic_shards(shards_dir, n_shards=max(2, workers), per_shard=m.loader_per_shard)
    total, per_worker = benchmark_data.benchmark(shards, workers, m.loader_batches, m.loader_batch_size, m.loader_res)
    rec.figures.update(workers=workers, images_per_s=total, images_per_s_per_worker=per_worker, res=m.loader_res)
    base = base_sdpa_run(ctx, ctx.earlier.get("throughput.base", {}).get("micro_batch", -1))
    if base is None or not ctx.on_cuda:
        rec.skip("the loader (all cores) keeps up with the mplug.en.base step",
                 "needs the GPU throughput of mplug.en.base" if ctx.on_cuda else "CPU timings are no performance claim")
    else:
        rec.check("the loader (all cores) keeps up with the mplug.en.base step", total >= base["samples_per_s"],
                  f"{total:.0f} images/s vs {base['samples_per_s']:.0f} samples/s")
    rec.summary = f"{total:.0f} images/s with {workers} workers ({per_worker:.0f} per worker, {m.loader_res} px)"


STEPS: dict[str, Callable[[Context, StepRecord], None]] = {
    "environment": environment,
    "correctness.bf16": correctness_bf16,
    "correctness.fp16": correctness_fp16,
    "correctness.grad_checkpointing": correctness_grad_checkpointing,
    "correctness.cuda_vs_cpu": correctness_cuda_vs_cpu,
    "kernels": kernels,
    "throughput.base": throughput_base,
    "throughput.base_checkpointing": throughput_base_checkpointing,
    "throughput.base_timix": throughput_base_timix,
    "throughput.large": throughput_model("large"),
    "throughput.huge": throughput_model("huge"),
    "loader": loader,
}


# ---------------------------------------------------------------------------------------------- worker
def earlier_figures(events: Path) -> dict[str, dict[str, Any]]:
    """Figures of the steps already finished in this check (by an earlier worker too)."""
    if not events.exists():
        return {}
    rows = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    return {r["step"]: r.get("figures", {}) for r in rows if r["event"] == "end"}


def run_steps(names: list[str], mode: Mode, events: Path, scratch: Path, kit: Path | None) -> int:
    """Run ``names`` in order, appending start/end events; returns 3 after a step raised (stop here), else 0."""
    world = prepare_world_env()
    device = torch.device("cuda", world.local_rank) if mode.device == "cuda" else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(device)
    with events.open("a") as sink:
        def emit(record: dict[str, Any]) -> None:
            sink.write(json.dumps(record, default=str) + "\n")
            sink.flush()

        if device.type == "cuda" and not torch.cuda.is_available():
            for name in names:  # nothing here can run: every step fails at once, with the reason
                emit({"event": "start", "step": name, "time": time.time()})
                emit({"event": "end", "step": name, "status": "failed", "seconds": 0.0, "summary": "", "checks": [],
                      "figures": {}, "error": f"--{mode.name} needs a CUDA device and torch sees none "
                                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                                              "run --cpu on a machine without a GPU"})
            return 0
        for name in names:
            emit({"event": "start", "step": name, "time": time.time()})
            ctx = Context(mode, world, device, scratch, earlier_figures(events), kit)
            rec, error, started = StepRecord(), None, time.perf_counter()
            try:
                STEPS[name](ctx, rec)
            except Exception as err:  # recorded; the next step starts in a fresh worker
                error = "".join(traceback.format_exception(err)[-12:])
            status = "failed" if error else rec.status
            emit({"event": "end", "step": name, "status": status, "seconds": round(time.perf_counter() - started, 2),
                  "summary": rec.summary, "checks": rec.checks, "figures": rec.figures, "error": error})
            if error:
                return 3
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), required=True)
    parser.add_argument("--steps", help="comma-separated step names, run in this order")
    parser.add_argument("--events", type=Path, help="JSON-lines file the events are appended to")
    parser.add_argument("--scratch", type=Path, required=True, help="directory for run outputs and shards")
    parser.add_argument("--kit", type=Path, default=None, help="the carry kit (its BUILD_INFO.json is reported)")
    parser.add_argument("--reference-step", type=Path, default=None,
                        help="only run the fp32 reference step on the CPU and write its result here")
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    mode = MODES[args.mode]
    if args.reference_step:
        ctx = Context(replace(mode, device="cpu"), prepare_world_env(), torch.device("cpu"), args.scratch, {}, None)
        atomic_write_text(args.reference_step, json.dumps(reference_step(ctx)))
        return
    names = args.steps.split(",")
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; known: {', '.join(STEPS)}")
    sys.exit(run_steps(names, mode, args.events, args.scratch, args.kit))


if __name__ == "__main__":
    main()
