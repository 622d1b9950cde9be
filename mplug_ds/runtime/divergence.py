"""The rank-divergence check (``run.check_collectives``): every K optimizer steps the ranks compare what they did
since the last check — every collective (kind, size, call site) and every call of a module of the trained model —
and stop at once, naming the first entry that differs, when they did not do the same.

Under ZeRO-3 each module call gathers parameters, so a rank that calls a module once more than the others hangs
them all (DeepSpeed#7998); under ZeRO-1/2 the same rank-dependent branch runs silently until it reaches a
collective. The check makes either an immediate, named error. Its cost: a forward pre-hook per module (an append)
and one append per collective, a hash and one 4-value all-reduce per check; on a mismatch, rank 0's sequence is
broadcast, each rank finds its first differing entry, the ranks agree on the earliest (entry, rank), and that rank's
and rank 0's descriptions of the entry are broadcast; every rank raises ``CollectiveDivergence`` with them.
"""
from __future__ import annotations

import hashlib
from array import array
from functools import lru_cache
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mplug_ds.runtime import collectives

TEXT_BYTES = 1024  # a broadcast description's size
_MODULE = 1 << 62  # module-call codes: this bit plus the module's index


class CollectiveDivergence(RuntimeError):
    """The ranks made different collectives or module calls since the last check."""


@lru_cache(maxsize=4096)
def _collective_code(kind: str, size: int, site: str) -> int:
    digest = hashlib.blake2b(f"{kind}|{size}|{site}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class DivergenceCheck:
    """Records this rank's collectives and calls of ``module``'s submodules; ``end_step(step)`` compares them across
    ranks every ``every_steps`` steps (a collective: call it at the same step on every rank); its tensors live on
    ``device`` (the backend's: a GPU under NCCL). ``close()`` stops."""

    def __init__(self, module: nn.Module, every_steps: int, device: torch.device | str = "cpu") -> None:
        self.every_steps, self.step, self.since, self.device = every_steps, 1, 0, device
        self.names = [name or type(module).__name__ for name, _ in module.named_modules()]
        self.codes: list[int] = []
        self.entries: list[tuple[Any, int]] = []  # (module index or collectives.Call, step) per code
        self._hooks = [m.register_forward_pre_hook(self._module_hook(i)) for i, m in enumerate(module.modules())]
        collectives.observe(self._collective)

    def _module_hook(self, index: int):
        def record(module: nn.Module, args: Any) -> None:
            self.codes.append(_MODULE | index)
            self.entries.append((index, self.step))
        return record

    def _collective(self, call: collectives.Call) -> None:
        if call.kind in collectives.POINT_TO_POINT:
            return
        self.codes.append(_collective_code(call.kind, collectives.comparable(call), call.site))
        self.entries.append((call, self.step))

    def close(self) -> None:
        """Remove the hooks and stop observing collectives."""
        for hook in self._hooks:
            hook.remove()
        collectives.observe(None)

    def resume_at(self, step: int) -> None:
        """The run continues after optimizer step ``step`` (a resumed run): entries count from step ``step + 1``."""
        self.step, self.since = step + 1, step

    def end_step(self, step: int) -> None:
        """Optimizer step ``step`` finished: compare every ``every_steps`` steps; raises ``CollectiveDivergence``."""
        if step % self.every_steps == 0:
            self.check(step)
        self.step = step + 1

    def _describe(self, entries: list[tuple[Any, int]], index: int) -> str:
        """Entry ``index`` of a compared window, for people."""
        if index >= len(entries):
            return f"nothing (its sequence ends after {len(entries)} entries)"
        what, step = entries[index]
        if isinstance(what, int):
            return f"module call {self.names[what]} (step {step})"
        return f"collective {what.kind} {what.nbytes} B at {what.site} (step {step})"

    def check(self, step: int) -> None:
        """Compare this rank's sequence since the last check with every other rank's (see the module docstring)."""
        codes, entries = self.codes, self.entries
        self.codes, self.entries = [], []  # the check's own collectives count towards the next window
        digest = int.from_bytes(hashlib.blake2b(array("q", codes).tobytes(), digest_size=8).digest(), "little") >> 1
        n = len(codes)
        summary = torch.tensor([digest, -digest, n, -n], dtype=torch.int64, device=self.device)
        dist.all_reduce(summary, op=dist.ReduceOp.MAX)
        high, low, longest, shortest = summary.tolist()
        if high == -low and longest == -shortest:
            self.since = step
            return
        raise CollectiveDivergence(self._first_difference(codes, entries, step))

    def _first_difference(self, codes: list[int], entries: list[tuple[Any, int]], step: int) -> str:
        rank, world, device = dist.get_rank(), dist.get_world_size(), self.device
        mine = torch.tensor(codes, dtype=torch.int64, device=device)
        length = torch.tensor([len(codes)], dtype=torch.int64, device=device)
        dist.broadcast(length, src=0)
        theirs = mine.clone() if rank == 0 else torch.empty(int(length), dtype=torch.int64, device=device)
        dist.broadcast(theirs, src=0)
        common = min(len(mine), len(theirs))
        differ = (mine[:common] != theirs[:common]).nonzero()
        first = int(differ[0]) if len(differ) else (common if len(mine) != len(theirs) else None)
        key = torch.tensor([first * world + rank if first is not None else torch.iinfo(torch.int64).max],
                           device=device)
        dist.all_reduce(key, op=dist.ReduceOp.MIN)  # the earliest difference, then the lowest rank with it
        index, culprit = divmod(int(key), world)
        differing = torch.tensor([int(first is not None)], device=device)
        dist.all_reduce(differing)
        others = int(differing)
        theirs_text = _broadcast_text(self._describe(entries, index) if rank == culprit else "", culprit, device)
        rank0_text = _broadcast_text(self._describe(entries, index) if rank == 0 else "", 0, device)
        message = (f"rank {culprit} differs from rank 0 in its collectives and module calls since the check after "
                   f"step {self.since} (run.check_collectives, checked after step {step}): at entry {index} rank "
                   f"{culprit} has {theirs_text}, rank 0 has {rank0_text}")
        if others == world - 1 > 1:
            message += "; every other rank differs from rank 0 there, so rank 0 is the odd one"
        elif others > 1:
            message += f"; {others} ranks differ from rank 0"
        if first is not None and rank != culprit:
            message += f"; this rank ({rank}) first differs at entry {first}: {self._describe(entries, first)}"
        return message


def _broadcast_text(text: str, src: int, device: torch.device | str) -> str:
    data = torch.zeros(TEXT_BYTES, dtype=torch.uint8)
    raw = text.encode()[:TEXT_BYTES]
    data[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    data = data.to(device)
    dist.broadcast(data, src=src)
    return bytes(data.tolist()).rstrip(b"\0").decode(errors="replace")
