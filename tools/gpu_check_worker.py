"""The worker of ``tools/gpu_check.py``: runs the steps it is given, in order, in this process.

    python tools/gpu_check_worker.py --mode quick --steps environment,kernels --events E.jsonl --scratch DIR

It appends one JSON line per event to the events file: ``{"event": "start", "step": ...}`` before a step and the
step's result (status, seconds, summary, checks, figures, error) after it. After a step raised, the worker exits
(status 3) so that the next step starts in a fresh process (a CUDA error or a fragmented allocator does not carry
over); ``tools/gpu_check.py`` restarts it, enforces each step's time-out and writes the report. This file also
holds the environment step and ``--reference-step`` (the CPU half of ``correctness.cuda_vs_cpu``).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from deepspeed.accelerator import get_accelerator
from packaging.requirements import Requirement

import gpu_check_correctness as correctness
import gpu_check_throughput as throughput
import mplug_ds
from gpu_check_base import MODES, Context, Mode, StepRecord
from mplug_ds.runtime.atomic import atomic_write_text
from mplug_ds.runtime.launch_env import prepare_world_env


def version_of(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


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


NOT_CARRIED = {"pycocoevalcap"}  # caption metrics: not used by this check, left out of the carry kit


def unmet_requirements() -> list[str]:
    """mplug_ds's install requirements that the installed packages miss or do not satisfy (``NOT_CARRIED`` aside)."""
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


# ---------------------------------------------------------------------------------------------- environment
def environment(ctx: Context, rec: StepRecord) -> None:
    """Versions, the device, bf16 support, and the device's measured matmul and copy ceilings."""
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


STEPS: dict[str, Callable[[Context, StepRecord], None]] = {
    "environment": environment,
    "correctness.bf16": correctness.bf16,
    "correctness.fp16": correctness.fp16,
    "correctness.grad_checkpointing": correctness.grad_checkpointing,
    "correctness.cuda_vs_cpu": correctness.cuda_vs_cpu,
    "kernels": correctness.kernels,
    "throughput.base": throughput.base,
    "throughput.base_checkpointing": throughput.base_checkpointing,
    "throughput.base_timix": throughput.base_timix,
    "throughput.large": throughput.larger_model("large"),
    "throughput.huge": throughput.larger_model("huge"),
    "loader": throughput.loader,
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
                emit({"event": "end", "step": name, "status": "failed", "seconds": 0.0, "checks": [],
                      "summary": "not run: torch sees no CUDA device",
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
        atomic_write_text(args.reference_step, json.dumps(correctness.reference_step(ctx)))
        return
    names = args.steps.split(",")
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; known: {', '.join(STEPS)}")
    sys.exit(run_steps(names, mode, args.events, args.scratch, args.kit))


if __name__ == "__main__":
    main()
