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


def range_over_ranks(values: list[int], device: torch.device | str = "cpu") -> tuple[list[int], list[int]]:
    """The smallest and the largest of each of ``values`` over all ranks, in one all-reduce (equal lists when every
    rank holds the same values)."""
    if get_world_size() == 1:
        return list(values), list(values)
    t = torch.tensor([*values, *(-v for v in values)], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    n = len(values)
    return [-v for v in t[n:].tolist()], t[:n].tolist()


class _GatherLocalGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = get_world_size(), get_rank()
        gathered = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(gathered, x.contiguous())
        ctx.rank, ctx.world, ctx.rows = rank, world, x.shape[0]
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows] * ctx.world


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, for a loss every rank computes
    identically over the gathered rows.

    Backward returns this rank's slice of the gradient times the world size: summed over ranks that is the
    full gradient, so after data-parallel gradient averaging every rank holds exactly the gradient of the
    single-process loss over the global batch, with no communication in backward.
    """
    if get_world_size() == 1:
        return x
    return _GatherLocalGrad.apply(x)


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, without gradient."""
    if get_world_size() == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(gathered, x.contiguous())
    return torch.cat(gathered, dim=0)
