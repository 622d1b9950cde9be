"""What a pre-training step needs on each device, before any job starts: memory by kind and communication by part.

The model is built on the meta device (no weights are allocated). Static memory follows the layout DeepSpeed gives
the stage in ``deepspeed.config`` (compute-dtype parameters, gradients and their buffers, fp32 master weights, Adam
moments) and the momentum teacher as ``models/momentum`` keeps it (partitioned under ZeRO on several ranks).
Activations are the tensors autograd saves for backward, counted by running the step's modules (the same calls
``PretrainModel`` makes, at the same shapes) on meta tensors; with activation checkpointing a checkpointed block
keeps only its input, and one block's activations come back during backward. On a CPU device the figure is the
process's resident memory: the libraries' own footprint (``CPU_RUNTIME_BYTES``) is added and large buffers count
only as far as they are written; on a GPU it is what PyTorch allocates (the CUDA context, ~0.5 GiB, is extra).

Communication is the analytic minimum of what each step's collectives carry (buffer bytes, as
``runtime/collectives`` records them): ZeRO's gradient reduction and parameter gathers, the teacher's weight gathers,
the contrastive all-gathers and the loop's agreement all-reduces.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mplug_ds.engine.ds_config import build_ds_config, offloads_optimizer, zero_stage
from mplug_ds.models.config import ModelConfig
from mplug_ds.models.mplug import MPLUG
from mplug_ds.objectives.pretrain_config import TrainConfig

CPU_RUNTIME_BYTES = int(0.74 * 2**30)  # resident after importing torch 2.14, DeepSpeed and mplug_ds (measured)
GIB = 2**30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MEMORY_ROWS = ("parameters", "gradients", "optimizer", "teacher", "zero_buffers", "activations", "runtime")


@dataclass
class StepShape:
    """The tensors one micro-batch puts through the model."""

    batch: int
    image_size: int
    text_len: int  # padded caption tokens (prefix and target get half each, + [CLS]/[SEP])
    mlm_probability: float = 0.15
    region_images: int = 0  # TiMix: region images per rank (0: TiMix off)
    phrases_per_image: int = 5


@dataclass
class Plan:
    """Per-device memory (bytes) by kind, host memory of offloaded state, and communication per optimizer step."""

    stage: int
    world_size: int
    device: str  # "cpu" (resident memory) or "cuda" (allocated memory)
    memory: dict[str, float]
    init_peak: float  # before DeepSpeed partitions anything: the full fp32 model and teacher on every rank
    host: float  # offloaded optimizer state and master weights (CPU memory, not counted in ``memory``)
    comm: dict[str, dict[str, float]]  # part -> {"calls", "bytes"} (buffer bytes)
    notes: list[str] = field(default_factory=list)

    @property
    def step_peak(self) -> float:
        return sum(self.memory.values())

    @property
    def peak(self) -> float:
        """The predicted peak: the larger of the step's and the initialisation's."""
        return max(self.step_peak, self.init_peak)


def plan_step(cfg: TrainConfig, model: ModelConfig, world_size: int, device: str = "cuda") -> Plan:
    """The plan for ``cfg`` (a validated pre-training config and its resolved model) on ``world_size`` ranks."""
    ds = build_ds_config(cfg, world_size)
    zero = ds.get("zero_optimization", {})
    stage, offload = zero_stage(ds), offloads_optimizer(ds)
    precision = cfg.deepspeed.precision
    c = torch.finfo(DTYPES[precision]).bits // 8
    shape = StepShape(cfg.batch.micro_batch_per_gpu, model.vision.image_size, cfg.data.max_text_len,
                      cfg.objective.mlm_probability,
                      cfg.timix.region_images_per_gpu if cfg.timix.enabled else 0)
    with torch.device("meta"):
        online = MPLUG(model)
        teacher = MPLUG(model, teacher=True) if cfg.objective.distill else None
    n = sum(p.numel() for p in online.parameters())
    t = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    w = world_size
    memory = dict.fromkeys(MEMORY_ROWS, 0.0)
    host = 0.0
    notes: list[str] = []
    cpu = device == "cpu"
    bucket = float(zero.get("reduce_bucket_size", 5e8))
    touched = (lambda size: min(size, n)) if cpu else (lambda size: size)  # CPU: pages count once written
    if stage == 0:
        memory["parameters"] = c * n
        memory["gradients"] = c * n + (4 * n if c != 4 else 0)  # bf16/fp16: DeepSpeed also accumulates in fp32
        memory["optimizer"] = 8 * n + (4 * n if c != 4 else 0)  # Adam moments (+ fp32 master weights)
        if w > 1:
            memory["zero_buffers"] = c * touched(bucket)
    elif stage in (1, 2):
        memory["parameters"] = c * n
        grads = c * n if stage == 1 else c * n / w  # ZeRO-1 keeps full gradients until the step
        memory["gradients"] = grads + 4 * n / w  # + the fp32 gradient of this rank's partition at the step
        buffers = (2 if zero.get("overlap_comm") else 1) * c * touched(bucket)
        memory["zero_buffers"] = buffers if stage == 2 else c * touched(bucket)
        state = 12 * n / w  # fp32 master partition + Adam moments
        memory["optimizer"], host = (0.0, state) if offload else (state, 0.0)
    else:
        threshold = float(zero.get("stage3_param_persistence_threshold", 1e5))
        live = float(zero.get("stage3_max_live_parameters", 1e9))
        small = sum(p.numel() for p in online.parameters() if p.numel() <= threshold)
        gathered = min(n, live) if zero.get("stage3_max_reuse_distance", 1e9) >= n else min(n, 2 * bucket)
        memory["parameters"] = c * (n / w + small + gathered * (w - 1) / w)
        memory["gradients"] = 4 * n / w
        memory["zero_buffers"] = c * touched(min(bucket, n)) * 2
        state = (8 + (4 if c != 4 else 0)) * n / w  # Adam moments (+ fp32 master partition unless fp32)
        memory["optimizer"], host = (0.0, state + 4 * n / w) if offload else (state, 0.0)
        if offload:
            memory["gradients"] = 0.0
    partitioned = teacher is not None and stage >= 1 and w > 1
    if teacher is not None:
        if not partitioned:
            memory["teacher"] = 4 * t
        elif stage in (1, 2):
            memory["teacher"] = 4 * t / w + c * t  # fp32 shard + the compute-dtype replica it gathers into
        else:
            unit = max(_largest_unit(teacher, float(zero.get("stage3_prefetch_bucket_size", 5e7))), 1)
            memory["teacher"] = 4 * t / w + 2 * c * unit  # fp32 shard + one gathered unit and its gather buffer
    memory["activations"] = activation_bytes(model, shape, DTYPES[precision], w)
    if cpu:
        memory["runtime"] = CPU_RUNTIME_BYTES
    init_peak = 4 * n + 4 * t + c * n + (CPU_RUNTIME_BYTES if cpu else 0)  # fp32 model + teacher + first flat copy
    if stage == 0 and c == 4:
        init_peak = 4 * n + 4 * t + (CPU_RUNTIME_BYTES if cpu else 0)
    comm = step_communication(stage, w, n, t, c, shape, model, cfg, teacher, partitioned)
    if stage == 3 and zero.get("stage3_max_live_parameters", 1e9) >= n:
        notes.append("ZeRO-3 keeps gathered parameters alive through the step (stage3_max_live_parameters and "
                     "stage3_max_reuse_distance exceed the model): parameters count in full at the peak")
    return Plan(stage, w, device, memory, init_peak, host, comm, notes)


def step_communication(stage: int, w: int, n: int, t: int, c: int, shape: StepShape, model: ModelConfig,
                       cfg: TrainConfig, teacher: nn.Module | None, partitioned: bool) -> dict[str, dict[str, float]]:
    """The analytic minimum per optimizer step by part: ``{part: {"calls": k, "bytes": b}}`` (buffer bytes)."""
    if w == 1:
        return {}
    accum = cfg.batch.grad_accum_steps
    comm: dict[str, dict[str, float]] = {}
    if stage == 0:
        comm["zero"] = {"calls": 1, "bytes": c * n * accum}  # gradient all-reduce
    elif stage in (1, 2):
        comm["zero"] = {"calls": 2, "bytes": c * n * (accum if stage == 2 else 1) + c * n}  # reduce, then gather
    else:
        comm["zero"] = {"calls": 2, "bytes": (c * n + c * n) * accum}  # forward gather + gradient reduce-scatter
    if teacher is not None and cfg.objective.alpha > 0:
        if partitioned and stage in (1, 2):
            comm["teacher_forward"] = {"calls": 1, "bytes": c * t}
        elif partitioned:
            text = sum(p.numel() for p in teacher.text_encoder.parameters())
            comm["teacher_forward"] = {"calls": 1, "bytes": c * (t + text) * accum}  # text encoder runs twice
    feature = 4 * shape.batch * w * model.embed_dim
    gathers = 4 if teacher is not None and cfg.objective.alpha > 0 else 2
    comm["ita"] = {"calls": gathers * accum, "bytes": gathers * feature * accum}
    keys = 5
    comm["agreement"] = {"calls": 2 * accum, "bytes": (8 * (keys + 2) + 8) * accum}
    return comm


class _SavedTensors:
    """Distinct non-parameter tensors autograd saves (bytes by identity); with checkpointed ``blocks``, what a block
    saves itself is set aside (it is recomputed in backward) and the block's tensor inputs are kept instead."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        self.saved: dict[int, int] = {}
        self.kept_inputs: dict[int, int] = {}
        self.largest_block = 0
        self._before: set[int] = set()
        self._hooks = [h for block in blocks for h in (block.register_forward_pre_hook(self._enter),
                                                         block.register_forward_hook(self._leave))]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        base = x._base if x._base is not None else x
        if not isinstance(base, nn.Parameter):
            self.saved[id(base)] = base.numel() * base.element_size()
        return x

    def _enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        for arg in args:
            if isinstance(arg, torch.Tensor):
                self.kept_inputs[id(arg)] = arg.numel() * arg.element_size()
        self._before = set(self.saved)

    def _leave(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        added = [key for key in self.saved if key not in self._before]
        self.largest_block = max(self.largest_block, sum(self.saved[key] for key in added))
        for key in added:
            del self.saved[key]

    def total(self) -> int:
        for hook in self._hooks:
            hook.remove()
        return sum({**self.saved, **self.kept_inputs}.values()) + self.largest_block


def activation_bytes(model: ModelConfig, shape: StepShape, dtype: torch.dtype, world: int) -> float:
    """Bytes saved for backward by one micro-batch of the pre-training step (see the module docstring)."""
    with torch.device("meta"):
        m = MPLUG(dataclasses.replace(model, grad_checkpointing=False)).to(dtype)
    counter = _SavedTensors(_checkpointed_blocks(m) if model.grad_checkpointing else [])
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda x: x):
        _pretrain_forward(m, shape, dtype, world)
    return float(counter.total())


def _pretrain_forward(m: MPLUG, s: StepShape, dtype: torch.dtype, world: int) -> None:
    """The online model's calls in ``PretrainModel.losses`` (and TiMix's extra passes) at the step's shapes."""
    meta = {"device": "meta"}
    b, length, hidden = s.batch, s.text_len, m.cfg.text.hidden_size
    half = length // 2 + 1
    images = torch.empty(b, 3, s.image_size, s.image_size, dtype=dtype, **meta)

    def ids(rows: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(rows, size, dtype=torch.long, **meta), torch.ones(rows, size, dtype=torch.long, **meta))

    text_ids, text_mask = ids(b, length)
    image = m.encode_image(images)
    text = m.encode_text(text_ids, text_mask)
    features = torch.cat([m.image_feature(image), m.text_feature(text)])  # ITA: (W·B)² similarities, small
    (features.repeat(world, 1) @ features.repeat(world, 1).t()).sum()
    three = lambda x: torch.cat([x, x, x])  # noqa: E731 — ITM: positives and both kinds of negatives
    _, fused = m.fuse(three(image), three(text), three(text_mask))
    m.itm_head(fused[:, 0])
    _, fused = m.fuse(image, m.encode_text(text_ids, text_mask), text_mask)  # MLM
    picked = max(1, round(s.mlm_probability * b * (length - 2)))
    m.mlm_head(fused.reshape(-1, hidden)[:picked]).float().log_softmax(-1)
    prefix_ids, prefix_mask = ids(b, half)
    image_out, text_out = m.fuse(image, m.encode_text(prefix_ids, prefix_mask), prefix_mask)  # prefix LM
    memory, memory_mask = m.memory(image_out, text_out, prefix_mask)
    target_ids, target_mask = ids(b, half)
    states = m.decoder.bert(target_ids, target_mask, memory, memory_mask)[:, :-1]
    m.decoder.cls(states.reshape(-1, hidden)).float().log_softmax(-1)
    if s.region_images:  # TiMix: the mixed images' second ViT pass, the alignment pass on region images
        m.image_feature(m.encode_image(images))
        regions = torch.empty(s.region_images, 3, s.image_size, s.image_size, dtype=dtype, **meta)
        m.visual(regions, stop_after=m.cfg.vision.layers // 2)
        m.encode_text(*ids(s.region_images * s.phrases_per_image, length))


def _checkpointed_blocks(m: MPLUG) -> list[nn.Module]:
    """The blocks ``grad_checkpointing`` recomputes in backward: ViT blocks, fusion layers, decoder layers."""
    return [*m.visual.vit.blocks, *m.fusion.encoder.layer, *m.decoder.bert.encoder.layer]


def _largest_unit(teacher: nn.Module, bucket: float) -> int:
    from mplug_ds.runtime.partitioned_ema import gather_units

    return max(sum(p.numel() for p in params) for _, params in gather_units(teacher, int(bucket)))


def largest_micro_batch(cfg: TrainConfig, model: ModelConfig, world_size: int, device: str,
                        budget: float) -> tuple[int, str]:
    """The largest micro-batch per device whose predicted peak fits in ``budget`` bytes, and, when not even one
    sample fits, the reason (what the peak is made of and by how much it is over)."""
    def at(batch: int) -> Plan:
        return plan_step(dataclasses.replace(cfg, batch=dataclasses.replace(cfg.batch, micro_batch_per_gpu=batch)),
                         model, world_size, device)

    one, two = at(1), at(2)
    if one.peak > budget:
        parts = sorted(one.memory.items(), key=lambda kv: -kv[1])
        biggest = ", ".join(f"{name} {value / GIB:.2f}" for name, value in parts[:4])
        phase = "initialisation" if one.init_peak >= one.step_peak else "one sample per device"
        return 0, (f"{phase} needs {one.peak / GIB:.2f} GiB, {(one.peak - budget) / GIB:.2f} GiB over "
                   f"(step: {biggest} GiB; initialisation: {one.init_peak / GIB:.2f} GiB)")
    per_sample = max(two.step_peak - one.step_peak, 1.0)
    batch = max(1, int((budget - (one.step_peak - per_sample)) // per_sample))
    while batch > 1 and at(batch).peak > budget:  # the linear estimate checked against the exact count
        batch -= max(1, batch // 64)
    return batch, ""
