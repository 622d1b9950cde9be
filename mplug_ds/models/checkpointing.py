"""Activation checkpointing for one block, shared by the fusion and decoder stacks (the ViT uses timm's own)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint


def run_block(block: Callable[..., Any], *args: Any, enabled: bool) -> Any:
    """Call ``block(*args)``, recomputing its activations in backward when ``enabled`` and grad is on.

    Non-reentrant checkpointing: it supports several forwards of the same module per step (the fusion
    encoder runs for ITM positives, negatives, MLM and prefix LM) and keyword-free non-tensor arguments.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
