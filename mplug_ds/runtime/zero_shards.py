"""This rank's share of the fp32 master weights under ZeRO-1/2/3, read from DeepSpeed's optimizer: per optimizer
group the flat master partition and, for every parameter, which of its elements the rank holds and where.

ZeRO-1/2 (``DeepSpeedZeroOptimizer``): a group's trainable parameters are views into one flat compute-dtype buffer
(``bit16_groups_flat[g]``, padded to a multiple of the world size); rank r owns the r-th equal slice of it and keeps
that slice's fp32 master copy (``single_partition_of_fp32_groups[g]``).

ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter is flattened, padded to a multiple of the world size and
cut into equal slices (``param.ds_tensor``, rank r holds elements ``[r·P, (r+1)·P)``); a (sub-)group's fp32 master
partition (``fp32_partitioned_groups_flat[g]``) is this rank's slices of its parameters back to back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Slot:
    """Where one parameter sits in its group on this rank.

    ``local``: the offset of this rank's slice in the group's master partition. ``start``/``length``: the elements
    of the flattened parameter that slice holds (``length`` 0 when the rank holds none, or only padding).
    ``flat_offset`` (ZeRO-1/2): the parameter's offset in the group's flat buffer of all ranks. ``partition``
    (ZeRO-3): the slice size every rank holds (padding included).
    """

    param: nn.Parameter
    local: int
    start: int
    length: int
    flat_offset: int = 0
    partition: int = 0


@dataclass
class Group:
    """One optimizer (sub-)group on this rank: its fp32 master partition and the parameters laid out in it."""

    master: torch.Tensor  # 1-D fp32 master partition when the layout was read (``ZeroShards.master``: the current one)
    compute_dtype: torch.dtype  # the dtype the model computes in (its bit16 copy)
    slots: list[Slot]  # every parameter of the group, in the group's order
    flat_numel: int = 0  # ZeRO-1/2: elements of the group's flat buffer over all ranks (world × partition)


@dataclass
class ZeroShards:
    """The ZeRO stage, this rank's place in the data-parallel group, and every optimizer group's layout."""

    stage: int
    rank: int
    world_size: int
    process_group: Any
    groups: list[Group]
    optimizer: Any

    def master(self, g: int) -> torch.Tensor:
        """Group ``g``'s fp32 master partition as the optimizer holds it now (a checkpoint load may replace it)."""
        o = self.optimizer
        return o.fp32_partitioned_groups_flat[g] if self.stage == 3 else o.single_partition_of_fp32_groups[g]


def zero_shards(optimizer: Any, stage: int) -> ZeroShards:
    """The layout of ``optimizer`` (the engine's ZeRO optimizer) for stage 1, 2 or 3.

    Raises ``ValueError`` for layouts this cannot follow: DeepSpeed's round-robin gradient order, or ZeRO-3 master
    weights swapped to NVMe.
    """
    if stage == 3:
        return _stage3(optimizer)
    if stage in (1, 2):
        return _stage1_2(optimizer, stage)
    raise ValueError(f"ZeRO stage {stage} keeps no partitioned master weights")


def _stage1_2(opt: Any, stage: int) -> ZeroShards:
    if getattr(opt, "round_robin_gradients", False):
        raise ValueError("zero_optimization.round_robin_gradients reorders the optimizer's flat buffers; "
                         "the partitioned momentum teacher needs it off")
    group_pg = opt.real_dp_process_group[0]
    rank, world = dist.get_rank(group=group_pg), dist.get_world_size(group=group_pg)
    groups = []
    for g, params in enumerate(opt.bit16_groups):
        flat = opt.bit16_groups_flat[g]
        master = opt.single_partition_of_fp32_groups[g]
        partition = flat.numel() // world
        if flat.numel() % world or master.numel() != partition:
            raise ValueError(f"optimizer group {g}: flat buffer of {flat.numel()} elements is not split into "
                             f"{world} equal partitions of {master.numel()}")
        low, high = rank * partition, (rank + 1) * partition
        slots = []
        for param, offset in zip(opt.round_robin_bit16_groups[g], opt.round_robin_bit16_offsets[g]):
            first, last = max(offset, low), min(offset + param.numel(), high)
            held = max(0, last - first)
            slots.append(Slot(param, local=first - low if held else 0, start=first - offset if held else 0,
                              length=held, flat_offset=offset))
        groups.append(Group(master, flat.dtype, slots, flat_numel=flat.numel()))
    return ZeroShards(stage, rank, world, group_pg, groups, opt)


def _stage3(opt: Any) -> ZeroShards:
    if getattr(opt, "params_in_nvme_and_cpu", False) or any(
            opt._swappable_optimizer_subgroup(g) for g in range(len(opt.fp16_groups))):
        raise ValueError("ZeRO-3 with NVMe offload swaps the master weights out of memory; the partitioned momentum "
                         "teacher supports offload to CPU only")
    process_group = opt.dp_process_group
    rank, world = dist.get_rank(group=process_group), dist.get_world_size(group=process_group)
    groups = []
    for g, params in enumerate(opt.fp16_groups):
        master = opt.fp32_partitioned_groups_flat[g]
        slots, local = [], 0
        for param in params:
            partition = param.partition_numel()
            start = rank * partition
            slots.append(Slot(param, local=local, start=start, length=max(0, min(partition, param.ds_numel - start)),
                              partition=partition))
            local += partition
        if local != master.numel():
            raise ValueError(f"optimizer sub-group {g}: its parameters' partitions hold {local} elements but the "
                             f"fp32 master partition has {master.numel()}")
        groups.append(Group(master, params[0].ds_tensor.dtype, slots))
    return ZeroShards(3, rank, world, process_group, groups, opt)


def full_shape(param: nn.Parameter) -> torch.Size:
    """The shape of a parameter as the model sees it (ZeRO-3 keeps it in ``ds_shape``)."""
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape
