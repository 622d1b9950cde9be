"""Momentum (EMA) teacher: fp32 copies of the online encoders, outside the optimizer and the DeepSpeed engine.

On one rank, without ZeRO, or when an online parameter it follows is frozen, the teacher is a full fp32 replica
updated from each parameter's fp32 master value. Under ZeRO-1/2/3 on several ranks ``attach`` partitions it like the
optimizer partitions the master weights (``runtime/partitioned_ema``): each rank updates its own share with no
collective, and the weights the teacher runs with are gathered in the compute dtype when its forward needs them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mplug_ds.models.mplug import MPLUG
from mplug_ds.runtime import collectives
from mplug_ds.runtime.master_weights import master_weight_source
from mplug_ds.runtime.partitioned_ema import PartitionedEMA, consolidate_shards
from mplug_ds.runtime.zero_shards import zero_shards

ParamSource = Callable[[str, nn.Parameter], torch.Tensor]
GROUP_KEY = "teacher"  # the optimizer groups of the parameters the teacher follows


def _detached_fp32(name: str, param: nn.Parameter) -> torch.Tensor:
    return param.detach().float()


class MomentumTeacher:
    """EMA copies of every online module the teacher uses (ViT, projections, text encoder, fusion, MLM head).

    Deliberately not an ``nn.Module`` attribute of the trained model: DeepSpeed never partitions it, never casts
    it to bf16 (EMA increments of 0.005·Δ vanish in bf16) and never hands it to the optimizer. Create it before
    ``deepspeed.initialize`` so the first copy sees full weights, and keep the parameters it follows in optimizer
    groups of their own (``group_key``). The teacher runs in eval mode (no dropout).
    """

    partition = True  # False keeps the replicated teacher under ZeRO too (tools/benchmark.py's baseline)

    def __init__(self, online: MPLUG, momentum: float) -> None:
        self.momentum = momentum
        self.model = MPLUG(online.cfg, teacher=True).float().eval().requires_grad_(False)
        online_params = dict(online.named_parameters(remove_duplicate=False))
        self.pairs = [(name, p_m, online_params[name]) for name, p_m in self.model.named_parameters()]
        self._followed = {id(p) for _, _, p in self.pairs}
        self.partitioned: PartitionedEMA | None = None
        self._source: ParamSource | None = None
        self.update(momentum=0.0)

    def group_key(self, param: nn.Parameter) -> str:
        """``"teacher"`` for an online parameter the teacher follows, else ``""`` (``Recipe.param_group_key``)."""
        return GROUP_KEY if id(param) in self._followed else ""

    def attach(self, engine: Any) -> None:
        """After ``deepspeed.initialize``: under ZeRO on several ranks, partition (from the fp32 copy where it was
        built, so the full copy never reaches the device); then move to the engine's device."""
        stage, world = int(engine.zero_optimization_stage()), engine.dp_world_size
        if not self.partition or stage == 0 or world == 1 or any(not p.requires_grad for _, _, p in self.pairs):
            self._source = master_weight_source()  # the replicated teacher of a one-rank / stage-0 run
        else:
            bucket = int(engine.zero_prefetch_bucket_size()) if stage == 3 else 0
            self.partitioned = PartitionedEMA(self.model, self.pairs, zero_shards(engine.optimizer, stage),
                                              engine.device, bucket)
        self.model.to(engine.device)

    @torch.no_grad()
    def update(self, source: ParamSource | None = None, momentum: float | None = None) -> None:
        """``teacher ← m·teacher + (1−m)·online`` after an optimizer step, in a fixed order.

        Partitioned: each rank's share against its fp32 master partition, no collective. Replicated: per parameter
        against ``source(name, param)`` (default: after ``attach``, the fp32 master value; before it, the parameter
        itself). Every collective is counted as the ``teacher_update`` part.
        """
        m = self.momentum if momentum is None else momentum
        with collectives.part("teacher_update"):
            if self.partitioned is not None:
                self.partitioned.update(m)
                return
            get = source or self._source or _detached_fp32
            for name, p_m, p in self.pairs:
                value = get(name, p).to(device=p_m.device, dtype=torch.float32).view_as(p_m)
                p_m.lerp_(value, 1.0 - m)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The replicated teacher's fp32 weights (``None`` when partitioned: see ``shard_state``)."""
        return None if self.partitioned is not None else self.model.state_dict()

    def shard_state(self) -> dict[str, Any] | None:
        """This rank's share of the partitioned teacher (``None`` when replicated)."""
        return self.partitioned.state_dict() if self.partitioned is not None else None

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore full fp32 teacher weights by name (strict), as ``state_dict`` saved them."""
        if self.partitioned is None:
            self.model.load_state_dict(state)
            return
        expected = {name for name, _, _ in self.pairs}
        if set(state) != expected:
            raise RuntimeError(f"teacher weights do not match the model: missing {sorted(expected - set(state))[:3]}, "
                               f"unexpected {sorted(set(state) - expected)[:3]}")
        self.partitioned.load_full(state)

    def load_shards(self, files: list[Path]) -> None:
        """Restore from the ``shard_state`` files of every rank of a run, on any number of ranks."""
        if self.partitioned is None:
            self.model.load_state_dict(consolidate_shards(files))
        else:
            self.partitioned.load_shard_files(files)
