"""Momentum (EMA) teacher: fp32 copies of the online encoders, outside the optimizer and the DeepSpeed engine."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mplug_ds.models.mplug import MPLUG

ParamSource = Callable[[str, nn.Parameter], torch.Tensor]


def _detached_fp32(name: str, param: nn.Parameter) -> torch.Tensor:
    return param.detach().float()


class MomentumTeacher:
    """EMA copies of every online module the teacher uses (ViT, projections, text encoder, fusion, MLM head).

    Deliberately not an ``nn.Module`` attribute of the trained model: DeepSpeed never partitions it, never casts
    it to bf16 (EMA increments of 0.005·Δ vanish in bf16) and never hands it to the optimizer. Create it before
    ``deepspeed.initialize`` so the first copy sees full weights. The teacher runs in eval mode (no dropout).
    """

    def __init__(self, online: MPLUG, momentum: float) -> None:
        self.momentum = momentum
        self.model = MPLUG(online.cfg, teacher=True).float().eval().requires_grad_(False)
        online_params = dict(online.named_parameters(remove_duplicate=False))
        self.pairs = [(name, p_m, online_params[name]) for name, p_m in self.model.named_parameters()]
        self.update(momentum=0.0)

    @torch.no_grad()
    def update(self, source: ParamSource | None = None, momentum: float | None = None) -> None:
        """``teacher ← m·teacher + (1−m)·source(online)`` for every pair, in a fixed order.

        ``source(name, param)`` returns the full fp32 value of an online parameter; the default detaches the
        parameter itself. Under ZeRO-3 pass a source returning the fp32 master weight (a collective that every
        rank calls in the same order).
        """
        m = self.momentum if momentum is None else momentum
        get = source or _detached_fp32
        for name, p_m, p in self.pairs:
            value = get(name, p).to(device=p_m.device, dtype=torch.float32).view_as(p_m)
            p_m.lerp_(value, 1.0 - m)

    def to(self, device: torch.device | str) -> "MomentumTeacher":
        """Move the fp32 copies to ``device``."""
        self.model.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 teacher weights, for checkpoints."""
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore teacher weights saved by ``state_dict`` (strict)."""
        self.model.load_state_dict(state)
