"""Steady-state throughput of the pre-training step on the real DeepSpeed engine.

    python tools/benchmark.py --model tiny --steps 5
    python tools/benchmark.py --model mplug.en.base --zero 2 --batch 64 --steps 20 --precision bf16 \
        --attn sdpa --baseline-attn eager
    deepspeed --num_gpus 8 tools/benchmark.py --model mplug.en.large --zero 3 --batch 32 --steps 20
    python tools/benchmark.py --model mplug.en.base --batch 64 --steps 20 --timix
    python tools/benchmark.py --model tiny --steps 20 --watchdog
    deepspeed --num_gpus 2 tools/benchmark.py --model tiny --steps 20 --check-collectives

Prints samples/s, step time, achieved TFLOP/s and MFU (FLOPs counted analytically from the config, see
mplug_ds/engine/flops.py), and peak memory beside the peak ``tools/plan.py`` predicts for the same configuration.
``--baseline-attn`` measures a second attention backend in the same run and prints the ratio; ``--timix`` measures
the TiMix step (patch-text alignment + mixed pass, one optimizer step) and the plain step in the same run and prints
TiMix / plain step time (TFLOP/s and MFU count the plain step's FLOPs in both lines). Each timed step is the
trainer's own ``Trainer.optimizer_step`` (schedule, forward, non-finite guard, backward, optimizer step, momentum
update, step record). On several ranks it also prints the communication of a step by part (ZeRO, teacher forward
and update, ITA gathers, the loop's agreement), measured by the step's own accounting (``comm`` in metrics.jsonl),
beside the analytic minimum for the stage (``objectives/plan.step_communication``); ``--replicated-teacher`` also
measures the teacher replicated on every rank (the implementation before partitioning) and prints the two side by
side. Batches are synthetic, padded like training batches (``--text-len`` tokens per caption) and resident on the
device, so data loading is not measured (tools/benchmark_data.py measures the loader). ``--watchdog`` times blocks
of ``--steps`` steps with the hang watchdog off and on in turn (``--repeats`` pairs, the same engine) and prints the
on / off step time; ``--check-collectives`` measures a second engine with ``run.check_collectives`` (2+ ranks) and
prints its step time / the plain one's.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mplug_ds.engine.flops import TextLengths, device_peak_tflops, pretrain_flops_per_sample
from mplug_ds.engine.logging import peak_memory_gb
from mplug_ds.objectives.plan import GIB, plan_step, step_communication
from mplug_ds.objectives.pretrain_config import load_train_config, validate
from mplug_ds.runtime.collectives import traffic_bytes
from mplug_ds.runtime.guards import StopRequest
from mplug_ds.runtime import watchdog
from mplug_ds.runtime.launch_env import prepare_world_env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``: these arguments instead of ``sys.argv``, as tools/gpu_check.py passes them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="model config name or YAML path")
    parser.add_argument("--zero", type=int, default=2, choices=(1, 2, 3), help="ZeRO stage")
    parser.add_argument("--offload", action="store_true", help="ZeRO-3 with CPU offload (zero3_offload.json)")
    parser.add_argument("--zero-on-one-rank", action="store_true",
                        help="keep ZeRO-1/2 on a 1-rank run (default: stage 0 there, see deepspeed.zero_on_one_rank)")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per device")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--attn", default="sdpa", help="attention backend: sdpa | flash_attn | eager")
    parser.add_argument("--baseline-attn", default=None, help="also measure this backend and print the ratio")
    parser.add_argument("--precision", default=None, choices=("bf16", "fp16", "fp32"),
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--text-len", type=int, default=30, help="caption tokens (padded length)")
    parser.add_argument("--timix", action="store_true",
                        help="time the TiMix step (alignment + mixing, fused) and the plain step in this run and "
                             "print the step-time ratio; region batches: batch/8 images × 4 phrases")
    parser.add_argument("--watchdog", action="store_true",
                        help="also time the step with the hang watchdog running, in blocks alternating with it off")
    parser.add_argument("--repeats", type=int, default=3, help="--watchdog: pairs of (off, on) blocks")
    parser.add_argument("--check-collectives", action="store_true",
                        help="also measure with run.check_collectives=true (the divergence check; 2+ ranks)")
    parser.add_argument("--replicated-teacher", action="store_true",
                        help="also measure the teacher replicated on every rank (the EMA from each parameter's full "
                             "fp32 master value) and print it against the partitioned one")
    parser.add_argument("--json", action="store_true", help="print one JSON line per measurement")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, attn: str, world, out_dir: str, timix: bool = False,
            check: bool = False, watchdog_pairs: int = 0, replicated: bool = False) -> dict:
    """Build the engine for one configuration and time ``args.steps`` optimizer steps of the trainer's own step
    (``timix``: with TiMix on and γ = 1 from the first step, so every timed step mixes; ``check``: with the
    divergence check; ``replicated``: with the momentum teacher replicated on every rank); then ``watchdog_pairs``
    pairs of blocks with the hang watchdog off, then on."""
    from mplug_ds.engine.trainer import Trainer
    from mplug_ds.models.momentum import MomentumTeacher
    from mplug_ds.objectives.timix_recipe import pretrain_recipe

    precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    ds = "zero3_offload" if args.offload else f"zero{args.zero}"
    blocks = 1 + 2 * watchdog_pairs
    total = args.warmup + blocks * args.steps + 1  # never the last step: no end-of-run progress line
    cfg = load_train_config("synthetic_tiny", [
        f"model.name={args.model}", f"model.overrides.attn_backend={attn}",
        f"model.overrides.grad_checkpointing={str(args.grad_checkpointing).lower()}",
        f"batch.micro_batch_per_gpu={args.batch}", "batch.grad_accum_steps=1", f"deepspeed.config={ds}",
        f"deepspeed.zero_on_one_rank={str(args.zero_on_one_rank).lower()}",
        f"deepspeed.precision={precision}", f"data.max_text_len={args.text_len}", "logging.report_to=[none]",
        f"schedule.total_steps={total}", f"schedule.warmup_steps={min(2, total)}", f"logging.every_steps={total}",
        "logging.progress_bar=false", f"run.output_dir={out_dir}",
        *(["timix.enabled=true", "timix.gamma_ramp_steps=0", f"timix.region_images_per_gpu={max(1, args.batch // 8)}"]
          if timix else []), *(["run.check_collectives=true"] if check else [])])
    resolved = validate(cfg, world.world_size)
    MomentumTeacher.partition = not replicated
    try:
        trainer = Trainer(cfg, resolved, world, pretrain_recipe(cfg, resolved))
    finally:
        MomentumTeacher.partition = True
    engine = trainer.engine
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    stop = StopRequest()

    def timed(watched: bool) -> float:
        with trainer.watching() if watched else contextlib.nullcontext():
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.optimizer_step(data, stop)
            sync()
            return time.perf_counter() - start

    try:  # the engine is destroyed however this ends (a caller may retry a smaller batch after running out of memory)
        batch = {k: v.to(engine.device) for k, v in next(iter(trainer.stream)).items()}  # resident: no copy per step
        data = itertools.repeat(batch)
        for _ in range(args.warmup):
            trainer.optimizer_step(data, stop)
        sync()
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.device)
        elapsed = timed(False)
        pairs = []  # (off, on); every other pair runs on first, so a drift of the machine does not favour either
        for i in range(watchdog_pairs):
            pairs.append((timed(False), timed(True)) if i % 2 == 0 else tuple(reversed((timed(True), timed(False)))))
        if watchdog_pairs:
            with trainer.watching() as dog:
                work = watchdog_work_s(dog, cfg.batch.grad_accum_steps, statistics.median(off for off, _ in pairs)
                                       / args.steps)
        zero_stage, peak_memory = engine.zero_optimization_stage(), peak_memory_gb(engine.device)
        checked = trainer.divergence is not None
    finally:
        stop.restore()
        trainer.logger.close()
        if trainer.divergence is not None:
            trainer.divergence.close()
        engine.destroy()

    lengths = TextLengths(text=batch["text_ids"].shape[1], prefix=batch["prefix_ids"].shape[1],
                          target=batch["target_ids"].shape[1])
    flops = pretrain_flops_per_sample(resolved.model, lengths, distill=trainer.recipe.teacher is not None,
                                      mlm_probability=resolved.objective.mlm_probability)
    samples_per_s = args.batch * world.world_size * args.steps / elapsed
    tflops_per_device = flops * samples_per_s / world.world_size / 1e12
    device_name = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
    peak = device_peak_tflops(device_name) if engine.device.type == "cuda" else None
    result = {
        "model": args.model, "timix": timix, "attn": attn, "zero": zero_stage, "offload": args.offload,
        "precision": precision, "grad_checkpointing": args.grad_checkpointing, "batch_per_device": args.batch,
        "world_size": world.world_size, "device": device_name, "steps": args.steps,
        "text_len": lengths.text, "skipped_batches": trainer.state.skipped_batches,
        "step_time_s": elapsed / args.steps, "samples_per_s": samples_per_s,
        "gflop_per_sample": flops / 1e9, "tflops_per_device": tflops_per_device,
        "mfu": tflops_per_device / peak if peak else None, "peak_memory_gb": peak_memory,
        "check_collectives": checked, "replicated_teacher": replicated,
        "planned_peak_gb": None if replicated else plan_step(cfg, resolved.model, world.world_size,
                                                             engine.device.type).peak / GIB,
    }
    if pairs:
        result["watchdog_off_step_time_s"] = statistics.median(off for off, _ in pairs) / args.steps
        result["watchdog_on_step_time_s"] = statistics.median(on for _, on in pairs) / args.steps
        result["watchdog_pair_ratios"] = [on / off for off, on in pairs]
        result["watchdog_work_s"] = work
    if world.rank == 0 and world.world_size > 1:  # the first timed block (the watchdog's blocks follow it)
        result["comm"] = measured_communication(f"{out_dir}/metrics.jsonl", args.warmup + 1, args.steps,
                                                world.world_size)
        result["comm_minimum"] = step_communication(cfg, resolved.model, world.world_size)
    return result


def watchdog_work_s(dog: watchdog.HangWatchdog, micro_batches: int, step_s: float, calls: int = 20000) -> float:
    """Seconds of the watchdog's own work per step, each part timed over ``calls`` calls: the step's ``phase``, a
    ``beat`` per micro-batch, and its thread's checks (deadline, trigger file) once per poll interval."""
    def per_call(fn) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    trigger = dog.hang_dir / watchdog.TRIGGER
    beat = per_call(lambda: watchdog.beat(micro_batch="1/1"))
    return (per_call(lambda: watchdog.phase("train", 1)) + micro_batches * beat
            + per_call(lambda: (dog.deadline(), trigger.exists())) * step_s / dog.poll_s)


def measured_communication(metrics: str, first: int, steps: int, world_size: int) -> dict[str, dict[str, float]]:
    """Per optimizer step over steps ``first`` .. ``first + steps - 1``, by part: collectives, buffer bytes and bytes
    one rank sends (``traffic_bytes``), from the step records' ``comm`` accounting."""
    records = [json.loads(line) for line in Path(metrics).read_text().splitlines()]
    timed = [r["comm"] for r in records if r.get("event") == "step" and first <= r["step"] < first + steps]
    out: dict[str, dict[str, float]] = {}
    for comm in timed:
        for part, kinds in comm.items():
            entry = out.setdefault(part, {"calls": 0.0, "bytes": 0.0, "sent": 0.0})
            for kind, c in kinds.items():
                entry["calls"] += c["calls"] / len(timed)
                entry["bytes"] += c["bytes"] / len(timed)
                entry["sent"] += traffic_bytes(kind, c["bytes"], world_size) / len(timed)
    return out


def communication_table(result: dict) -> str:
    """Bytes per optimizer step by part, measured beside the analytic minimum for the stage."""
    measured, minimum = result["comm"], result["comm_minimum"]
    lines = [f"communication per optimizer step (rank 0, mean of {result['steps']} steps; buffer bytes as recorded, "
             "sent = what one rank sends with ring collectives):",
             f"  {'part':<16} {'collectives':>11} {'buffer MiB':>11} {'sent MiB':>9} {'minimum MiB':>12}"]
    for part in sorted(set(measured) | set(minimum)):
        m = measured.get(part, {"calls": 0, "bytes": 0, "sent": 0})
        least = f"{minimum[part] / 2**20:12.3f}" if part in minimum else f"{'-':>12}"
        lines.append(f"  {part:<16} {m['calls']:11.1f} {m['bytes'] / 2**20:11.3f} {m['sent'] / 2**20:9.3f} {least}")
    total = sum(m["bytes"] for m in measured.values())
    lines.append(f"  {'all':<16} {sum(m['calls'] for m in measured.values()):11.1f} {total / 2**20:11.3f} "
                 f"{sum(m['sent'] for m in measured.values()) / 2**20:9.3f} {sum(minimum.values()) / 2**20:12.3f}")
    return "\n".join(lines)


def replicated_comparison(partitioned: dict, replicated: dict) -> str:
    """The partitioned teacher against the replicated one, measured in the same run."""
    def total(result: dict, key: str) -> float:
        return sum(m[key] for m in result.get("comm", {}).values())

    return (f"partitioned vs replicated teacher (same run): {total(partitioned, 'calls'):.0f} vs "
            f"{total(replicated, 'calls'):.0f} collectives per step, {total(partitioned, 'bytes') / 2**20:.2f} vs "
            f"{total(replicated, 'bytes') / 2**20:.2f} MiB, "
            f"{partitioned['step_time_s'] / replicated['step_time_s']:.2f}x step time, peak memory "
            f"{partitioned['peak_memory_gb']:.2f} vs {replicated['peak_memory_gb']:.2f} GiB")


def report(result: dict, as_json: bool) -> str:
    """One human-readable (or JSON) line for a measurement."""
    if as_json:
        return json.dumps(result)
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (no known peak for this device)"
    name = f"{result['model']} +TiMix" if result["timix"] else result["model"]
    name += " +check_collectives" if result["check_collectives"] else ""
    name += " +replicated teacher" if result.get("replicated_teacher") else ""
    planned = f" (tools/plan.py: {result['planned_peak_gb']:.2f})" if result.get("planned_peak_gb") else ""
    return (f"{name} attn={result['attn']} zero={result['zero']} {result['precision']} "
            f"batch={result['batch_per_device']}x{result['world_size']} on {result['device']}: "
            f"{result['samples_per_s']:.2f} samples/s, {1000 * result['step_time_s']:.1f} ms/step, "
            f"{result['tflops_per_device']:.3f} TFLOP/s per device, MFU {mfu}, "
            f"peak memory {result['peak_memory_gb']:.2f} GiB{planned} "
            f"({result['gflop_per_sample']:.1f} GFLOP/sample)")


def main() -> None:
    args = parse_args()
    world = prepare_world_env()
    runs = [(args.attn, True, False, False), (args.attn, False, False, False)] if args.timix \
        else [(args.attn, False, False, False)]
    if args.baseline_attn:
        runs.append((args.baseline_attn, False, False, False))
    if args.check_collectives:
        runs.append((args.attn, False, True, False))
    if args.replicated_teacher:  # last: on a CPU peak memory is the process's high-water mark so far
        runs.append((args.attn, False, False, True))
    results = []
    with tempfile.TemporaryDirectory(prefix="mplug_ds-benchmark-") as out_dir:
        for i, (attn, timix, check, replicated) in enumerate(runs):
            if results:
                gc.collect()  # release the previous engine before building the next
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            pairs = args.repeats if args.watchdog and i == 0 else 0
            results.append(measure(args, attn, world, f"{out_dir}/{i}", timix, check, pairs, replicated))
    if world.rank != 0:
        return
    for result in results:
        print(report(result, args.json), flush=True)
        if world.world_size > 1 and not args.json:
            print(communication_table(result), flush=True)
    if args.timix:
        timix, plain = results[0], results[1]
        print(f"TiMix vs plain ({args.model}, same run): {timix['step_time_s'] / plain['step_time_s']:.2f}x step time, "
              f"{timix['peak_memory_gb'] / max(plain['peak_memory_gb'], 1e-9):.2f}x peak memory", flush=True)
    if args.watchdog:
        r = results[0]
        on, off = r["watchdog_on_step_time_s"], r["watchdog_off_step_time_s"]
        print(f"hang watchdog on vs off ({args.repeats} interleaved pairs of {args.steps} steps, same engine): "
              f"{on / off:.3f}x step time ({1000 * on:.1f} vs {1000 * off:.1f} ms, medians); on / off per pair: "
              f"{', '.join(f'{x:.3f}' for x in r['watchdog_pair_ratios'])} (median "
              f"{statistics.median(r['watchdog_pair_ratios']):.3f}); its own work, timed call by call: "
              f"{1e6 * r['watchdog_work_s']:.1f} us per step = {100 * r['watchdog_work_s'] / off:.4f}% of the step",
              flush=True)
    plain = results[1] if args.timix else results[0]
    if args.check_collectives:
        checked = results[-1]
        print(f"run.check_collectives vs off: {checked['step_time_s'] / plain['step_time_s']:.3f}x step time"
              + ("" if checked["check_collectives"] else " (one rank: the check compares ranks, so it is not on)"),
              flush=True)
    if args.replicated_teacher:
        print(replicated_comparison(plain, results[-1]), flush=True)
    if args.baseline_attn:
        first, baseline = plain, results[results.index(plain) + 1]
        ratio = first["samples_per_s"] / baseline["samples_per_s"]
        memory = first["peak_memory_gb"] / max(baseline["peak_memory_gb"], 1e-9)
        print(f"{args.attn} vs {args.baseline_attn}: {ratio:.2f}x samples/s, {memory:.2f}x peak memory", flush=True)


if __name__ == "__main__":
    main()
