"""The throughput and loader steps of ``tools/gpu_check.py``: ``tools/benchmark.py``'s measurement of the
trainer's step at the largest micro-batch that fits (mplug.en.base against eager attention, with checkpointing,
with TiMix; mplug.en.large; mplug.en.huge on ZeRO-3), and ``tools/benchmark_data.py`` on every core."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch

import benchmark
import benchmark_data
from gpu_check_base import Context, StepRecord, release_memory

MEMORY_HEADROOM = 0.85  # share of the device's memory a planned micro-batch may fill (allocator slack, fragments)
MFU_TARGET = 0.40  # issue 23: mplug.en.base at ≥ 40% MFU (goal 45%)
TIMIX_RATIO_TARGET = 1.35  # docs/PERFORMANCE.md: TiMix step / plain step for mplug.en.base


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
    """True for CUDA's out-of-memory error (also when a library re-raised it as a plain RuntimeError)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def measure_fitting(ctx: Context, rec: StepRecord, model: str, zero: int, batch: int, tries: int = 3,
                    **kwargs: Any) -> dict[str, Any]:
    """``measure`` at ``batch``; after running out of device memory, again at 3/4 of it (``tries`` in all)."""
    for attempt in range(1, tries + 1):
        try:
            return measure(ctx, model, zero, batch, **kwargs)
        except RuntimeError as err:
            if not is_out_of_memory(err) or attempt == tries:
                raise
        release_memory()
        smaller = max(1, batch * 3 // 4)
        rec.figures.setdefault("out_of_memory", []).append({"batch": batch, "retried_at": smaller, **kwargs})
        batch = smaller


def largest_micro_batch(ctx: Context, rec: StepRecord, slot: str) -> int:
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
        result = measure(ctx, model, zero, probe, warmup=1, steps=1)
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


def base(ctx: Context, rec: StepRecord) -> None:
    """mplug.en.base (256 px; bf16 on a GPU) at the largest micro-batch: sdpa, and eager attention as the baseline."""
    model, zero = ctx.mode.models["base"]
    batch = largest_micro_batch(ctx, rec, "base")
    sdpa = measure_fitting(ctx, rec, model, zero, batch, attn="sdpa")
    eager = measure_fitting(ctx, rec, model, zero, sdpa["batch_per_device"], attn="eager")
    rec.figures.update(micro_batch=sdpa["batch_per_device"], runs=[sdpa, eager],
                       sdpa_vs_eager=sdpa["samples_per_s"] / eager["samples_per_s"])
    rec.check("the timed steps ran without skipped batches", sdpa["skipped_batches"] == 0 == eager["skipped_batches"])
    ceiling = ctx.earlier.get("environment", {}).get("matmul_tflops")
    if ctx.on_cuda and ceiling:  # against what this device's matmul reached, beside the datasheet peak
        rec.figures["share_of_measured_matmul"] = sdpa["tflops_per_device"] / ceiling
    mfu_target(ctx, rec, sdpa)
    rec.summary = f"{model} sdpa: {throughput_line(sdpa)}; {rec.figures['sdpa_vs_eager']:.2f}x eager's samples/s"


def base_batch(ctx: Context, rec: StepRecord) -> int:
    """The micro-batch ``throughput.base`` chose (searched again when that step did not finish)."""
    earlier = ctx.earlier.get("throughput.base", {})
    return earlier.get("micro_batch") or largest_micro_batch(ctx, rec, "base")


def base_sdpa_run(ctx: Context, batch: int) -> dict[str, Any] | None:
    """``throughput.base``'s sdpa measurement when it ran at ``batch``."""
    runs = ctx.earlier.get("throughput.base", {}).get("runs") or []
    return next((r for r in runs if r["attn"] == "sdpa" and r["batch_per_device"] == batch), None)


def base_checkpointing(ctx: Context, rec: StepRecord) -> None:
    """mplug.en.base with activation checkpointing on, against off, at the same micro-batch."""
    model, zero = ctx.mode.models["base"]
    batch = base_batch(ctx, rec)
    on = measure_fitting(ctx, rec, model, zero, batch, ckpt=True)
    off = base_sdpa_run(ctx, on["batch_per_device"]) or measure(ctx, model, zero, on["batch_per_device"])
    rec.figures.update(runs=[on, off], step_time_ratio=on["step_time_s"] / off["step_time_s"],
                       memory_ratio=on["peak_memory_gb"] / max(off["peak_memory_gb"], 1e-9))
    rec.summary = (f"checkpointing on: {rec.figures['step_time_ratio']:.2f}x step time, "
                   f"{rec.figures['memory_ratio']:.2f}x peak memory (batch {on['batch_per_device']})")


def base_timix(ctx: Context, rec: StepRecord) -> None:
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


def larger_model(slot: str) -> Callable[[Context, StepRecord], None]:
    """The throughput step of a larger model: sdpa at its largest micro-batch."""
    def step(ctx: Context, rec: StepRecord) -> None:
        model, zero = ctx.mode.models[slot]
        result = measure_fitting(ctx, rec, model, zero, largest_micro_batch(ctx, rec, slot))
        rec.figures.update(micro_batch=result["batch_per_device"], runs=[result])
        rec.summary = f"{model} ZeRO-{zero}: {throughput_line(result)}"
    step.__doc__ = f"mplug.en.{slot} (bf16 on a GPU) at its largest micro-batch"
    return step


# ---------------------------------------------------------------------------------------------- loader
def loader(ctx: Context, rec: StepRecord) -> None:
    """``tools/benchmark_data.py`` on every core: decode + augment images/s, against the base step's need."""
    workers = os.cpu_count() or 1
    m = ctx.mode
    shards_dir = ctx.scratch / "loader"
    shards_dir.mkdir(parents=True, exist_ok=True)
    shards = benchmark_data.write_synthetic_shards(shards_dir, n_shards=max(2, workers), per_shard=m.loader_per_shard)
    total, per_worker, _ = benchmark_data.benchmark(shards, workers, m.loader_batches, m.loader_batch_size,
                                                    m.loader_res)  # images: one frame per sample
    rec.figures.update(workers=workers, images_per_s=total, images_per_s_per_worker=per_worker, res=m.loader_res)
    base = base_sdpa_run(ctx, ctx.earlier.get("throughput.base", {}).get("micro_batch", -1))
    if base is None or not ctx.on_cuda:
        rec.skip("the loader (all cores) keeps up with the mplug.en.base step",
                 "needs the GPU throughput of mplug.en.base" if ctx.on_cuda else "CPU timings are no performance claim")
    else:
        rec.check("the loader (all cores) keeps up with the mplug.en.base step", total >= base["samples_per_s"],
                  f"{total:.0f} images/s vs {base['samples_per_s']:.0f} samples/s")
    rec.summary = f"{total:.0f} images/s with {workers} workers ({per_worker:.0f} per worker, {m.loader_res} px)"
