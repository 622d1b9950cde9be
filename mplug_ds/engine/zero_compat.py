"""Work-arounds for DeepSpeed limitations, applied to the model just before ``deepspeed.initialize``."""
from __future__ import annotations

import torch
from torch import nn


def promote_scalar_params(module: nn.Module) -> list[str]:
    """Reshape 0-dim parameters (the contrastive temperature) to shape ``(1,)``; returns their names.

    DeepSpeed 0.19 broadcasts parameters as ``p.data.view(torch.uint8)``, which fails for 0-dim tensors.
    Arithmetic with a ``(1,)`` tensor broadcasts like a scalar; ``export.consolidate`` restores the original
    shape against the plain model, so exported weights keep the ``()`` shape of official checkpoints.
    """
    promoted = []
    for name, param in module.named_parameters():
        if param.ndim == 0:
            param.data = param.data.reshape(1)
            promoted.append(name)
    return promoted


def match_scalar_shapes(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo ``promote_scalar_params`` for a state dict: ``(1,)`` tensors whose reference is 0-dim become 0-dim."""
    out = dict(state)
    for key, value in state.items():
        ref = reference.get(key)
        if ref is not None and ref.ndim == 0 and value.shape == (1,):
            out[key] = value.reshape(())
    return out
