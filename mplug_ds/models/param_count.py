"""Parameter counting by module, with the convention used for the published model sizes."""
from __future__ import annotations

import torch
from torch import nn

from mplug_ds.models.config import ModelConfig
from mplug_ds.models.mplug import MPLUG

COUNTING_CONVENTION = (
    "Every parameter of the pre-training model as built (the ViT without CLIP's unused projection and text "
    "tower; the fusion layers that run, without dead layers or embeddings; the decoder with its LM head tied to "
    "its word embeddings, counted once; the MLM head; projections, ITM head and temperature). Momentum "
    "(EMA teacher) copies are reported separately and not included in the total.")


def count_parameters(module: nn.Module) -> int:
    """Unique parameters of ``module`` (tied weights counted once)."""
    return sum(p.numel() for p in module.parameters())


def parameter_report(cfg: ModelConfig) -> dict:
    """Total and per-module parameter counts of a model config, built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = MPLUG(cfg)
        teacher = MPLUG(cfg, teacher=True)
    modules = {name: n for name, child in model.named_children() if (n := count_parameters(child))}
    modules["temp"] = model.temp.numel()
    return {
        "model": cfg.name,
        "total": count_parameters(model),
        "modules": modules,
        "momentum_teacher": count_parameters(teacher),
        "convention": COUNTING_CONVENTION,
    }
