"""AdamW parameter groups (visual vs rest, decay vs no decay) and the per-optimizer-step LR schedule.

The schedule is stepped by the training loop after every optimizer step; it is never handed to DeepSpeed
(an epoch-indexed scheduler given to DeepSpeed is stepped per optimizer step and pins the LR — §12.14).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mplug_ds.engine.train_config import OptimSection, ScheduleSection

VISUAL_PREFIX = "visual."
# Matrices that are embeddings (token, position, class) get no decay; 1-D tensors (biases, norms) and the
# scalar temperature are excluded by shape.
NO_DECAY_NAME_PARTS = ("embeddings.", "pos_embed", "positional_embedding", "cls_token", "class_embedding", "temp")


def is_visual(name: str) -> bool:
    """True for parameters of the visual encoder (``visual.*``), wherever the model sits in a wrapper."""
    return name.startswith(VISUAL_PREFIX) or f".{VISUAL_PREFIX}" in name


def wants_decay(name: str, param: torch.Tensor) -> bool:
    """Weight decay for matrices only: not biases, norms, embeddings (token, position, class) or temperature."""
    if param.ndim < 2:
        return False
    lowered = name.lower()
    return not any(part in lowered for part in NO_DECAY_NAME_PARTS)


def param_groups(model: nn.Module, optim: OptimSection,
                 key: Callable[[nn.Parameter], str] = lambda param: "") -> list[dict]:
    """AdamW groups: {visual, rest} × {decay, no decay} × ``key(param)`` (e.g. followed by the momentum teacher or
    not); empty groups are left out.

    Each group carries ``base_lr`` (its peak learning rate) and ``name`` for logging. Frozen parameters
    (``requires_grad=False``) are not given to the optimizer.
    """
    buckets: dict[tuple[bool, bool, str], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        buckets.setdefault((is_visual(name), wants_decay(name, param), key(param)), []).append(param)
    groups = []
    for (visual, decay, extra), params in sorted(buckets.items()):
        lr = optim.visual_lr if visual else optim.lr
        name = f"{'visual' if visual else 'rest'}_{'decay' if decay else 'no_decay'}" + (f"_{extra}" if extra else "")
        groups.append({"params": params, "lr": lr, "base_lr": lr, "weight_decay": optim.weight_decay if decay else 0.0,
                       "name": name})
    return groups


@dataclass
class WarmupCosine:
    """LR multiplier per optimizer step: linear warm-up ``warmup_lr → base`` then cosine ``base → min_lr``.

    Step ``s`` is the number of optimizer steps already taken (0 before the first step). The warm-up and the
    floor are absolute learning rates shared by all groups; the peak is each group's own ``base_lr``.
    """

    cfg: ScheduleSection

    def lr(self, base_lr: float, step: int) -> float:
        """The learning rate for the optimizer step that follows ``step`` completed steps."""
        s = self.cfg
        if step < s.warmup_steps:
            return s.warmup_lr + (base_lr - s.warmup_lr) * step / s.warmup_steps
        decay_steps = max(1, s.total_steps - s.warmup_steps)
        progress = min(1.0, (step - s.warmup_steps) / decay_steps)
        floor = min(s.min_lr, base_lr)
        return floor + 0.5 * (base_lr - floor) * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> list[float]:
        """Set every group's ``lr`` for the next optimizer step; returns the new rates in group order."""
        rates = []
        for group in optimizer.param_groups:
            group["lr"] = self.lr(group["base_lr"], step)
            rates.append(group["lr"])
        return rates


def group_lr(optimizer: torch.optim.Optimizer, visual: bool) -> float:
    """The current learning rate of the visual (or the non-visual) groups."""
    for group in optimizer.param_groups:
        if group.get("name", "").startswith("visual") == visual:
            return group["lr"]
    return 0.0
