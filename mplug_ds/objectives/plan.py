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
from mplug_ds.engine.schedule import param_groups
from mplug_ds.models.config import ModelConfig
from mplug_ds.models.mplug import MPLUG
from mplug_ds.objectives.pretrain_config import TrainConfig
from mplug_ds.objectives.pretrain_recipe import LOSS_KEYS
from mplug_ds.runtime.partitioned_ema import gather_units

CPU_RUNTIME_BYTES = int(1.0 * 2**30)  # a training process less its tensors: torch 2.14, DeepSpeed, mplug_ds, gloo (measured)
GIB = 2**30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MEMORY_ROWS = ("parameters", "gradients", "optimizer", "teacher", "zero_buffers", "activations", "runtime")


_META_MODELS: dict[str, tuple[MPLUG, MPLUG]] = {}


def meta_models(model: ModelConfig) -> tuple[MPLUG, MPLUG]:
    """The online model (built without activation checkpointing) and its teacher on the meta device, built once per
    model config."""
    key = repr(dataclasses.replace(model, grad_checkpointing=False))
    if key not in _META_MODELS:
        with torch.device("meta"):
            online = MPLUG(dataclasses.replace(model, grad_checkpointing=False))
            _META_MODELS[key] = online, MPLUG(model, teacher=True)
    return _META_MODELS[key]


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
    init_peak: float  # while the run starts (see ``initialisation_peak``)
    init_host: float  # host memory per rank while the run starts on a GPU (the full fp32 model and teacher)
    host: float  # offloaded optimizer state and master weights (CPU memory, not counted in ``memory``)
    comm: dict[str, float]  # part -> buffer bytes per optimizer step (analytic minimum)
    notes: list[str] = field(default_factory=list)

    @property
    def step_peak(self) -> float:
        return sum(self.memory.values())

    @property
    def peak(self) -> float:
        """The predicted peak: the larger of the step's and the initialisation's (on a CPU device offloaded state
        lives in the same memory and is added)."""
        return max(self.step_peak, self.init_peak) + (self.host if self.device == "cpu" else 0.0)


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
    online, teacher = meta_models(model)
    teacher = teacher if cfg.objective.distill else None
    n = sum(p.numel() for p in online.parameters())
    t = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    w = world_size
    memory = dict.fromkeys(MEMORY_ROWS, 0.0)
    host = 0.0
    notes: list[str] = []
    cpu = device == "cpu"
    bucket = float(zero.get("reduce_bucket_size", 5e8))
    # CPU: a buffer's pages count once written, unless deterministic runs fill uninitialised memory
    touched = (lambda size: min(size, n)) if cpu and not cfg.run.deterministic else (lambda size: size)
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
        prefetch = float(zero.get("stage3_prefetch_bucket_size", 5e7))
        keeps_all = live >= n and zero.get("stage3_max_reuse_distance", 1e9) >= n
        gathered = n if keeps_all else min(n, small + 2 * prefetch)  # full copies alive at the peak
        memory["parameters"] = c * (n / w + gathered)  # this rank's partitions + the gathered parameters
        memory["gradients"] = 4 * n / w
        memory["zero_buffers"] = c * touched(bucket)  # the gradient reduction bucket
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
    memory["activations"] = activation_bytes(model, shape, DTYPES[precision], w, teacher is not None)
    if cpu:
        memory["runtime"] = CPU_RUNTIME_BYTES
    init_peak, init_host = initialisation_peak(memory, stage, n, t, c, _largest_group(online, teacher, cfg), cpu)
    comm = step_communication(cfg, model, w)
    if stage == 3 and memory["parameters"] >= c * n:
        notes.append("ZeRO-3 keeps gathered parameters alive through the step (stage3_max_live_parameters and "
                     "stage3_max_reuse_distance exceed the model): parameters count in full at the peak")
    return Plan(stage, w, device, memory, init_peak, init_host, host, comm, notes)


def initialisation_peak(memory: dict[str, float], stage: int, n: int, t: int, c: int, largest_group: int,
                        cpu: bool) -> tuple[float, float]:
    """Device and host memory while the run starts: ``(device, host)``.

    The recipe builds the full fp32 model and the teacher's fp32 replica in host memory on every rank (DeepSpeed
    then casts the model: a compute-dtype copy beside the fp32 one unless that is fp32); the replica stays until the
    teacher is partitioned, after DeepSpeed built its state on the device, and ZeRO-3 initialises the optimizer
    through an fp32 buffer the full size of its largest group. On a CPU device both are the same memory.
    """
    building = 4 * n + (c * n if c != 4 else 0) + 4 * t
    initialised = (memory["parameters"] + memory["gradients"] + memory["optimizer"] + memory["zero_buffers"]
                   + (4 * largest_group if stage == 3 else 0))
    if cpu:
        return memory["runtime"] + max(building, initialised + 4 * t), 0.0
    return initialised, building


def _largest_group(online: MPLUG, teacher: MPLUG | None, cfg: TrainConfig) -> int:
    """Parameters in the largest optimizer group (``engine/schedule.param_groups`` with the teacher's own groups)."""
    followed = {name for name, _ in teacher.named_parameters()} if teacher is not None else set()
    ids = {id(p) for name, p in online.named_parameters() if name in followed}
    groups = param_groups(online, cfg.optim, lambda p: "teacher" if id(p) in ids else "")
    return max(sum(p.numel() for p in g["params"]) for g in groups)


def step_communication(cfg: TrainConfig, model: ModelConfig, world_size: int) -> dict[str, float]:
    """The analytic minimum per optimizer step by part, in buffer bytes (what ``runtime/collectives`` records).

    ZeRO-1/2: the gradients reduced (every micro-batch under ZeRO-2) and the parameters gathered after the step;
    ZeRO-3: the parameters gathered for the forward and the gradients reduce-scattered, per micro-batch (a
    configuration that releases parameters between forward and backward gathers them again). The partitioned
    teacher's update moves nothing; its forward gathers its weights once per step (ZeRO-1/2) or per micro-batch,
    module by module, the text encoder twice (ZeRO-3). ITA all-gathers four fp32 feature matrices (two without
    distillation); the loop agrees on losses and flags once per micro-batch and on stop requests before each fetch.
    """
    if world_size == 1:
        return {}
    ds = build_ds_config(cfg, world_size)
    stage, accum = zero_stage(ds), cfg.batch.grad_accum_steps
    c = torch.finfo(DTYPES[cfg.deepspeed.precision]).bits // 8
    online, teacher = meta_models(model)
    n = sum(p.numel() for p in online.parameters())
    teacher = teacher if cfg.objective.distill else None
    zero = {0: c * n * accum, 1: 2 * c * n, 2: c * n * (accum + 1), 3: 2 * c * n * accum}[stage]
    comm = {"zero": float(zero)}
    distilled = teacher is not None and cfg.objective.alpha > 0
    if teacher is not None:
        t = sum(p.numel() for p in teacher.parameters())
        comm["teacher_update"] = 0.0
        if distilled and stage in (1, 2):
            comm["teacher_forward"] = float(c * t)
        elif distilled and stage == 3:
            text = sum(p.numel() for p in teacher.text_encoder.parameters())
            comm["teacher_forward"] = float(c * (t + text) * accum)
    comm["ita"] = float((4 if distilled else 2) * 4 * cfg.batch.micro_batch_per_gpu * world_size * model.embed_dim
                        * accum)
    comm["agreement"] = float(8 * (len(LOSS_KEYS) + 2 + 1) * accum)
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


def activation_bytes(model: ModelConfig, shape: StepShape, dtype: torch.dtype, world: int, distill: bool) -> float:
    """Bytes saved for backward by one micro-batch of the pre-training step, plus what the backward of its largest
    vocabulary head adds (see the module docstring)."""
    m = meta_models(model)[0].to(dtype)
    counter = _SavedTensors(_checkpointed_blocks(m) if model.grad_checkpointing else [])
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda x: x):
        logits = _pretrain_forward(m, shape, dtype, world, distill)
    return float(counter.total() + 2 * logits)  # backward of the loss: the largest logits' gradient, twice


def _pretrain_forward(m: MPLUG, s: StepShape, dtype: torch.dtype, world: int, distill: bool) -> int:
    """The online model's calls in ``PretrainModel.losses`` (and TiMix's extra passes) at the step's shapes; returns
    the bytes of the largest fp32 logits a vocabulary head produced."""
    meta = {"device": "meta"}
    b, length, hidden = s.batch, s.text_len, m.cfg.text.hidden_size
    half = length // 2 + 1
    images = torch.empty(b, 3, s.image_size, s.image_size, dtype=dtype, **meta)

    def ids(rows: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(rows, size, dtype=torch.long, **meta), torch.ones(rows, size, dtype=torch.long, **meta))

    def vocabulary_loss(head: nn.Module, states: torch.Tensor, soft_targets: bool) -> int:
        log_probs = head(states).float().log_softmax(-1)
        if soft_targets:  # distillation: the teacher's distribution times the log-probabilities
            (torch.empty_like(log_probs) * log_probs).sum()
        return log_probs.numel() * 4

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
    mlm = vocabulary_loss(m.mlm_head, fused.reshape(-1, hidden)[:picked], distill)
    prefix_ids, prefix_mask = ids(b, half)
    image_out, text_out = m.fuse(image, m.encode_text(prefix_ids, prefix_mask), prefix_mask)  # prefix LM
    memory, memory_mask = m.memory(image_out, text_out, prefix_mask)
    target_ids, target_mask = ids(b, half)
    states = m.decoder.bert(target_ids, target_mask, memory, memory_mask)[:, :-1]
    prefix = vocabulary_loss(m.decoder.cls, states.reshape(-1, hidden), False)
    if s.region_images:  # TiMix: the mixed images' second ViT pass, the alignment pass on region images
        m.image_feature(m.encode_image(images))
        regions = torch.empty(s.region_images, 3, s.image_size, s.image_size, dtype=dtype, **meta)
        m.visual(regions, stop_after=m.cfg.vision.layers // 2)
        m.encode_text(*ids(s.region_images * s.phrases_per_image, length))
    return max(mlm, prefix)


def _checkpointed_blocks(m: MPLUG) -> list[nn.Module]:
    """The blocks ``grad_checkpointing`` recomputes in backward: ViT blocks, fusion layers, decoder layers."""
    return [*m.visual.vit.blocks, *m.fusion.encoder.layer, *m.decoder.bert.encoder.layer]


def _largest_unit(teacher: nn.Module, bucket: float) -> int:
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
    per_sample = max(two.step_peak - one.step_peak, 1.0)  # activations grow linearly with the micro-batch
    batch = max(1, int((budget - (one.step_peak - per_sample)) // per_sample))
    while batch > 1 and at(batch).peak > budget:  # the linear estimate checked against the exact count
        batch = max(1, batch - 1 - int((at(batch).peak - budget) // per_sample))
    return batch, ""
