"""Process-group helpers shared by objectives and the engine (safe to call without torch.distributed)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """World size, 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; the gradient reaches only this rank's slice.

    Rows from other ranks are constants here. Because every rank computes the same global loss, the
    sum over ranks of the local-slice gradients equals the gradient of the single-process loss, which
    the data-parallel gradient averaging then reproduces (the loss is scaled by the world size).
    """
    world = get_world_size()
    if world == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x.detach().contiguous())
    gathered[get_rank()] = x
    return torch.cat(gathered, dim=0)
