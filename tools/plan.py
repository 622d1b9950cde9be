"""Memory and communication of a pre-training step per device, predicted before a job starts (nothing allocated).

    python tools/plan.py --model mplug.en.base --zero 2 --batch 64 --world-size 64
    python tools/plan.py --model mplug.en.huge --zero 3 --image-size 224 --world-size 8 --fit 80
    python tools/plan.py --model mplug.en.huge --zero 3 --offload --precision fp32 --device cpu --world-size 2 \
        --batch 2 --image-size 112 --grad-checkpointing --fit 24
    python tools/plan.py --config base --world-size 16 deepspeed.config=zero3 batch.micro_batch_per_gpu=32

Prints per-device memory by kind (parameters, gradients, optimizer state, momentum teacher, ZeRO buffers,
activations, runtime), the initialisation peak (DeepSpeed building its state while the fp32 teacher replica still
exists; on a CPU device also the full fp32 model the recipe builds), host memory at start and offloaded host
memory, and the analytic communication per optimizer step by part. ``--fit GIB``
answers the largest micro-batch whose predicted peak fits in GIB per device, or why none does and by how much.
``--device cpu`` predicts the resident memory of a CPU run (what the trainer logs as peak_mem_gb there).
"""
from __future__ import annotations

import argparse
import sys

from mplug_ds.config import ConfigError
from mplug_ds.objectives.plan import GIB, MEMORY_ROWS, Plan, largest_micro_batch, plan_step
from mplug_ds.objectives.pretrain_config import load_train_config, validate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="synthetic_tiny", help="pre-training config the flags below override")
    parser.add_argument("--model", help="model config name or YAML path")
    parser.add_argument("--zero", type=int, choices=(1, 2, 3),
                        help="ZeRO stage (a one-rank run uses stage 0 unless deepspeed.zero_on_one_rank=true)")
    parser.add_argument("--offload", action="store_true", help="ZeRO-3 with optimizer and parameters on the CPU")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--batch", type=int, help="micro-batch per device")
    parser.add_argument("--image-size", type=int, help="image resolution (default: the model's)")
    parser.add_argument("--text-len", type=int, help="padded caption tokens")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--timix", action="store_true", help="the TiMix step (alignment and mixed passes)")
    parser.add_argument("--world-size", type=int, default=8, help="data-parallel ranks")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: memory PyTorch allocates; cpu: resident memory of the process")
    parser.add_argument("--fit", type=float, metavar="GIB", help="largest micro-batch that fits in GIB per device")
    parser.add_argument("overrides", nargs="*", help="more key=value overrides of the config")
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides the flags stand for."""
    out = [f"deepspeed.precision={args.precision}"]
    if args.model:
        out.append(f"model.name={args.model}")
    if args.zero is not None:
        out.append(f"deepspeed.config={'zero3_offload' if args.offload else f'zero{args.zero}'}")
    if args.batch:
        out.append(f"batch.micro_batch_per_gpu={args.batch}")
    if args.image_size:
        out.append(f"model.overrides.vision.image_size={args.image_size}")
    if args.text_len:
        out.append(f"data.max_text_len={args.text_len}")
    if args.grad_checkpointing:
        out.append("model.overrides.grad_checkpointing=true")
    if args.timix:
        out.append("timix.enabled=true")
    return out + ["batch.grad_accum_steps=1", *args.overrides]


def format_plan(plan: Plan, title: str) -> str:
    """The plan as a table (GiB per device, bytes per step)."""
    lines = [f"=== {title}: ZeRO stage {plan.stage}, {plan.world_size} ranks, {plan.device} ===",
             "memory per device                GiB"]
    for row in MEMORY_ROWS:
        lines.append(f"  {row:<28} {plan.memory[row] / GIB:8.2f}")
    lines.append(f"  {'step peak':<28} {plan.step_peak / GIB:8.2f}")
    lines.append(f"  {'initialisation peak':<28} {plan.init_peak / GIB:8.2f}")
    lines.append(f"  {'predicted peak':<28} {plan.peak / GIB:8.2f}")
    if plan.host:
        lines.append(f"  {'offloaded to host memory':<28} {plan.host / GIB:8.2f}")
    if plan.init_host:
        lines.append(f"  {'host memory at start':<28} {plan.init_host / GIB:8.2f}   (per rank: fp32 model and teacher)")
    lines.append("communication per optimizer step (analytic minimum, buffer bytes)")
    for part, size in plan.comm.items():
        lines.append(f"  {part:<28} {size / 2**20:12.3f} MiB")
    if not plan.comm:
        lines.append("  none (one rank)")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_train_config(args.config, overrides(args))
        resolved = validate(cfg, args.world_size)
    except ConfigError as err:
        print(f"plan: {err}", file=sys.stderr)
        return 2
    plan = plan_step(cfg, resolved.model, args.world_size, args.device)
    print(format_plan(plan, f"{resolved.model.name}, micro-batch {cfg.batch.micro_batch_per_gpu}, "
                            f"{resolved.model.vision.image_size} px, {cfg.data.max_text_len} tokens, "
                            f"{cfg.deepspeed.precision}"))
    if args.fit:
        batch, reason = largest_micro_batch(cfg, resolved.model, args.world_size, args.device, args.fit * GIB)
        print(f"largest micro-batch in {args.fit:g} GiB per device: {batch}" if batch else
              f"nothing fits in {args.fit:g} GiB per device: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
