"""An fp32 EMA of a DeepSpeed-trained module's parameters kept in the optimizer's own partitioning (ZeRO-1/2/3).

Each rank holds, for every optimizer group of the followed parameters, an fp32 shard shaped exactly like its fp32
master partition (``runtime/zero_shards``). The update is then one ``lerp_`` per group against the master weights,
with no collective; the fp32 state per rank is 4 bytes × parameters / world size. The shadow module (the teacher)
gets compute-dtype weights only to run:

* ZeRO-1/2: one all-gather (``all_gather_single``) per group fills a flat buffer laid out like the optimizer's,
  whose views are the shadow's parameters (a compute-dtype replica), at the shadow's first forward after an update;
* ZeRO-3: each gather unit is gathered when its forward starts and freed when it returns. A unit is one top-level
  child of the shadow, or, for a child above ``bucket`` elements, each block of its layer lists (one transformer
  layer) and the rest of the child — FSDP's per-block wrapping.

Every collective runs under ``collectives.part("teacher_forward")``. A rank's state (``state_dict``) is its shards and
where each parameter's elements sit in them; ``load_shard_files`` restores it from the files of any number of ranks
and ``consolidate_shards`` puts them together into full tensors (export, a one-rank resume).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from mplug_ds.runtime import collectives, safe_load
from mplug_ds.runtime.zero_shards import Slot, ZeroShards, full_shape

PART = "teacher_forward"


@dataclass
class _Shadowed:
    """A shadow parameter and where its online parameter's elements sit in this rank's shards."""

    name: str
    param: nn.Parameter  # the shadow module's parameter
    group: int
    slot: Slot
    shape: torch.Size


class PartitionedEMA:
    """``shadow ← m·shadow + (1−m)·master`` on this rank's share of the fp32 master weights.

    ``pairs``: ``(name, shadow parameter, online parameter)``; the shadow parameters hold the EMA's initial value
    (full, fp32) and are replaced by compute-dtype weights. Every optimizer group must hold only followed
    parameters or none (``MomentumTeacher.group_key`` keeps them apart).
    """

    def __init__(self, shadow: nn.Module, pairs: list[tuple[str, nn.Parameter, nn.Parameter]], shards: ZeroShards,
                 device: torch.device, bucket: int) -> None:
        self.shards, self.device = shards, device
        by_online = {id(online): (name, param) for name, param, online in pairs}
        self.groups: list[int] = []  # optimizer groups followed, in order
        self.fp32: list[torch.Tensor] = []  # this rank's EMA shard of each followed group
        self.entries: list[_Shadowed] = []
        for g, group in enumerate(shards.groups):
            followed = [id(s.param) in by_online for s in group.slots]
            if not any(followed):
                continue
            if not all(followed):
                raise ValueError(f"optimizer group {g} mixes parameters the teacher follows with others; give the "
                                 "teacher's parameters groups of their own (Recipe.param_group_key)")
            shard = torch.zeros_like(group.master)
            for slot in group.slots:
                name, param = by_online[id(slot.param)]
                if slot.length:
                    shard[slot.local:slot.local + slot.length] = (
                        param.detach().reshape(-1)[slot.start:slot.start + slot.length].to(shard.device))
                self.entries.append(_Shadowed(name, param, len(self.groups), slot, full_shape(slot.param)))
            self.groups.append(g)
            self.fp32.append(shard)
        missing = sorted(set(name for name, _, _ in pairs) - {e.name for e in self.entries})
        if missing:
            raise ValueError(f"the optimizer holds no master weights for {missing[:3]} (frozen parameters are "
                             "followed only by the replicated teacher)")
        self.stale = True
        self.flats: list[torch.Tensor] = []
        if shards.stage in (1, 2):
            self._bind_flat_views()
        else:
            self._release(self.entries)
        self._hooks = self._register_hooks(shadow, bucket)

    # ------------------------------------------------------------------ the EMA
    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """One ``lerp_`` per followed group against the optimizer's current master partition; no collective."""
        for shard, g in zip(self.fp32, self.groups):
            shard.lerp_(self.shards.master(g), 1.0 - momentum)
        self.stale = True

    # ------------------------------------------------------------------ weights for the forward
    def _bind_flat_views(self) -> None:
        """ZeRO-1/2: one compute-dtype flat buffer per group; the shadow's parameters become views into it."""
        for i, g in enumerate(self.groups):
            group = self.shards.groups[g]
            self.flats.append(torch.empty(group.flat_numel, dtype=group.compute_dtype, device=self.device))
        for e in self.entries:
            e.param.data = self.flats[e.group].narrow(0, e.slot.flat_offset, e.shape.numel()).view(e.shape)

    @torch.no_grad()
    def _gather_flats(self) -> None:
        """ZeRO-1/2: every group's shards, in the compute dtype, all-gathered into its flat buffer."""
        with collectives.part(PART):
            for shard, flat in zip(self.fp32, self.flats):
                send = shard.to(device=self.device, dtype=flat.dtype)
                dist.all_gather_single(flat, send, group=self.shards.process_group)
        self.stale = False

    @torch.no_grad()
    def _gather(self, entries: list[_Shadowed]) -> None:
        """ZeRO-3: one all-gather of the unit's slices; each parameter gets its full compute-dtype value."""
        if not entries:
            return
        dtype = self.shards.groups[self.groups[entries[0].group]].compute_dtype
        send = torch.cat([self.fp32[e.group][e.slot.local:e.slot.local + e.slot.partition] for e in entries])
        send = send.to(device=self.device, dtype=dtype)
        world = self.shards.world_size
        out = torch.empty(world * send.numel(), dtype=dtype, device=self.device)
        with collectives.part(PART):
            dist.all_gather_single(out, send, group=self.shards.process_group)
        rows, offset = out.view(world, send.numel()), 0
        for e in entries:  # a copy per parameter, unless it is the unit's only one (then a view of ``out``)
            e.param.data = rows[:, offset:offset + e.slot.partition].reshape(-1)[:e.shape.numel()].view(e.shape)
            offset += e.slot.partition

    def _release(self, entries: list[_Shadowed]) -> None:
        for e in entries:
            e.param.data = torch.empty(0, dtype=self.shards.groups[self.groups[e.group]].compute_dtype,
                                       device=self.device)

    def _register_hooks(self, shadow: nn.Module, bucket: int) -> list[Any]:
        if self.shards.stage in (1, 2):
            def refresh(module: nn.Module, args: Any) -> None:
                if self.stale:
                    self._gather_flats()

            return [child.register_forward_pre_hook(refresh) for child in shadow.children()]
        by_param = {id(e.param): e for e in self.entries}
        hooks = []
        for module, params in gather_units(shadow, bucket):
            entries = [by_param[id(p)] for p in params if id(p) in by_param]
            hooks.append(module.register_forward_pre_hook(lambda m, a, entries=entries: self._gather(entries)))
            hooks.append(module.register_forward_hook(lambda m, a, o, entries=entries: self._release(entries)))
        return hooks

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This rank's shards and, per parameter, ``[shard, offset, first element, length]`` (plain data)."""
        return {"shards": list(self.fp32), "world_size": self.shards.world_size, "rank": self.shards.rank,
                "slots": {e.name: [e.group, e.slot.local, e.slot.start, e.slot.length]
                          for e in self.entries if e.slot.length},
                "shapes": {e.name: list(e.shape) for e in self.entries}}

    @torch.no_grad()
    def load_full(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take this rank's elements from full (unpartitioned) fp32 values by name."""
        for e in self.entries:
            if e.slot.length:
                values = state[e.name].reshape(-1)[e.slot.start:e.slot.start + e.slot.length]
                self.fp32[e.group][e.slot.local:e.slot.local + e.slot.length] = values.to(self.fp32[e.group].device)
        self.stale = True

    @torch.no_grad()
    def load_shard_files(self, files: list[Path]) -> None:
        """Take this rank's elements from the shard files of every rank of a run (any world size, any ZeRO stage);
        each file is memory-mapped, so only the overlapping elements are read."""
        wanted = {e.name: e for e in self.entries if e.slot.length}
        filled = 0
        for name, start, values in iter_fragments(files):
            e = wanted.get(name)
            if e is None:
                continue
            lo, hi = max(start, e.slot.start), min(start + values.numel(), e.slot.start + e.slot.length)
            if lo < hi:
                dst = self.fp32[e.group]
                dst[e.slot.local + lo - e.slot.start:e.slot.local + hi - e.slot.start] = values[lo - start:hi - start]
                filled += hi - lo
        needed = sum(e.slot.length for e in wanted.values())
        if filled != needed:
            raise RuntimeError(f"the teacher shards {files[0].parent}/… cover {filled} of this rank's {needed} "
                               "teacher elements; the checkpoint is incomplete or from another model")
        self.stale = True


def gather_units(shadow: nn.Module, bucket: int) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """The modules whose forward gathers parameters under ZeRO-3, each with the parameters it gathers.

    Every top-level child of ``shadow`` is a unit; one above ``bucket`` elements keeps only what lies outside its
    layer blocks (the elements of its outermost ``ModuleList``/``Sequential`` containers), and each block is a
    unit of its own.
    """
    units = []
    for child in shadow.children():
        params = list(child.parameters())
        if sum(p.numel() for p in params) <= bucket:
            units.append((child, params))
            continue
        blocks = list(_outer_blocks(child))
        inside = {id(p) for block in blocks for p in block.parameters()}
        units.append((child, [p for p in params if id(p) not in inside]))
        units += [(block, list(block.parameters())) for block in blocks]
    return units


def _outer_blocks(module: nn.Module) -> Iterator[nn.Module]:
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            yield from child.children()
        else:
            yield from _outer_blocks(child)


def iter_fragments(files: list[Path]) -> Iterator[tuple[str, int, torch.Tensor]]:
    """``(name, first element, values)`` of every parameter fragment in ``PartitionedEMA`` state files."""
    for path in files:
        state = safe_load.load(path, mmap=True)
        for name, (shard, local, start, length) in state["slots"].items():
            yield name, start, state["shards"][shard][local:local + length]


def consolidate_shards(files: list[Path]) -> dict[str, torch.Tensor]:
    """Full fp32 values by name from the ``PartitionedEMA`` state files of every rank of a run."""
    shapes = safe_load.load(files[0], mmap=True)["shapes"]
    full = {name: torch.zeros(torch.Size(shape)).reshape(-1) for name, shape in shapes.items()}
    filled = dict.fromkeys(full, 0)
    for name, start, values in iter_fragments(files):
        full[name][start:start + values.numel()] = values
        filled[name] += values.numel()
    short = [name for name, value in full.items() if filled[name] != value.numel()]
    if short:
        raise RuntimeError(f"the teacher shards {files[0].parent}/… do not cover {short[:3]} "
                           f"({len(files)} shard files); the checkpoint is incomplete")
    return {name: value.view(torch.Size(shapes[name])) for name, value in full.items()}
