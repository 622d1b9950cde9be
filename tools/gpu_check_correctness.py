"""The correctness and kernel steps of ``tools/gpu_check.py``: a bf16 and an fp16 step on ZeRO-1/2/3 with the
momentum teacher in fp32, activation checkpointing on = off, CUDA = CPU in fp32, and the fused kernels (sdpa's
backend selection, torch's fused AdamW)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from gpu_check_base import DTYPES, Context, StepRecord, built_trainer, device_batch, release_memory
from mplug_ds.data.collate import collate_caption
from mplug_ds.engine.trainer import Trainer
from mplug_ds.models.config import load_model_config
from mplug_ds.models.mplug import build_model
from mplug_ds.objectives.pretrain import PretrainConfig, PretrainModel
from mplug_ds.runtime.guards import StopRequest
from mplug_ds.runtime.master_weights import full_fp32_param

WORKER = Path(__file__).resolve().with_name("gpu_check_worker.py")
FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
TEST_MOMENTUM = 0.5  # the correctness runs' EMA factor: far from 1, so an EMA of the bf16 copy would show


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


# ---------------------------------------------------------------------------------------------- correctness
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
                    scale = getattr(engine.optimizer, "loss_scale", None)
                    scales.append(None if scale is None else float(scale))
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
                dynamic = bool(getattr(engine.optimizer, "dynamic_loss_scale", False))
                rec.check(f"{tag}: dynamic loss scaling", dynamic and all(s is not None and s > 0 for s in scales),
                          f"dynamic {dynamic}, loss scale after each step {scales}")
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


def bf16(ctx: Context, rec: StepRecord) -> None:
    """A bf16 pre-training step on ZeRO-1/2/3 (one device), the teacher fp32."""
    precision_steps(ctx, rec, "bf16", max_steps=1)


def fp16(ctx: Context, rec: StepRecord) -> None:
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
    return {k: float(out[k].detach()) for k in tr.recipe.loss_keys}, grads


def grad_checkpointing(ctx: Context, rec: StepRecord) -> None:
    """Activation checkpointing on and off give the same losses and gradients (the mode's precision: bf16 on a GPU;
    same weights, batch and RNG)."""
    runs = {}
    for ckpt in (False, True):
        with built_trainer(ctx, f"ckpt-{ckpt}", [f"deepspeed.precision={ctx.mode.precision}",
                                           f"model.overrides.grad_checkpointing={str(ckpt).lower()}"]) as tr:
            runs[ckpt] = loss_and_grads(tr, device_batch(tr), seed=1234)
    (loss_off, grads_off), (loss_on, grads_on) = runs[False], runs[True]
    loss_gap = max(relative_difference(loss_off[k], loss_on[k]) for k in loss_off)
    rec.check("same losses (relative 1e-2, a bf16 tolerance)", loss_gap <= 1e-2,
              f"loss {loss_off['loss']:.5f} vs {loss_on['loss']:.5f}; largest relative gap {loss_gap:.1e}")
    off, on = (torch.cat([g[n].flatten() for n in sorted(grads_off)]) for g in (grads_off, grads_on))
    gap = float((on - off).norm() / off.norm().clamp_min(1e-12))
    worst = max(sorted(grads_off), key=lambda n: float((grads_on[n] - grads_off[n]).norm()
                                                        / grads_off[n].norm().clamp_min(1e-12)))
    rec.check("same gradients (relative L2 gap ≤ 2e-2, a bf16 tolerance)", gap <= 2e-2,
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
    subprocess.run([sys.executable, str(WORKER), "--reference-step", str(out), "--mode", ctx.mode.name,
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


def cuda_vs_cpu(ctx: Context, rec: StepRecord) -> None:
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


# ---------------------------------------------------------------------------------------------- kernels
def sdpa_dispatch(ctx: Context, rec: StepRecord) -> list[str]:
    """The pre-training forward and backward of the kernel model (bf16 on a GPU) on padded captions: the sdpa kernels
    PyTorch's default dispatch picks (profiled), then the same with only fused backends allowed. Returns the fused
    kernels seen."""
    model_cfg = load_model_config(ctx.mode.kernel_model)
    module = PretrainModel(build_model(model_cfg), PretrainConfig())
    dtype = DTYPES[ctx.mode.precision]
    module.to(device=ctx.device, dtype=dtype)
    module.teacher.model.to(ctx.device)  # no engine: the replicated teacher
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
