"""Read the real fp32 value of a parameter under any ZeRO stage (the momentum teacher's EMA source)."""
from __future__ import annotations

from typing import Callable

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param
from torch import nn

ParamSource = Callable[[str, nn.Parameter], torch.Tensor]


def full_fp32_param(param: nn.Parameter) -> torch.Tensor:
    """The full, unpartitioned fp32 value of ``param``.

    Trainable parameters: the optimizer's fp32 master copy (``safe_get_full_fp32_param``; under ZeRO it is a
    collective, so every rank must call this for the same parameters in the same order). Frozen parameters
    have no master copy: under ZeRO-3 they are gathered, otherwise read directly. Never the bf16/fp16 compute
    copy and never the empty ZeRO-3 placeholder.
    """
    if param.requires_grad:
        master = safe_get_full_fp32_param(param)
        if master is not None:
            return master
    if hasattr(param, "ds_id"):
        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().float().clone()
    return param.detach().float()


def master_weight_source() -> ParamSource:
    """A ``MomentumTeacher.update`` source returning each online parameter's fp32 master value."""
    return lambda name, param: full_fp32_param(param)
