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


PUBLISHED_CONVENTION = (
    "The README sizes (350M base, 600M large; architecture doc section 9): the modules the official code executes "
    "-- the CLIP ViT including its (unused) projection matrix, visn_fc, the text encoder, all fusion layers that "
    "run including the connected layers' (unused) cross-attention, the decoder with its tied LM head counted "
    "once -- without the MLM head, contrastive projections, ITM head, temperature, CLIP text tower or momentum "
    "copies.")
# CLIP's image-projection width for the OpenAI towers (B/16: 768 -> 512, L/14: 1024 -> 768).
CLIP_EMBED_DIM = {768: 512, 1024: 768}


def published_size(cfg: ModelConfig, model: MPLUG) -> int:
    """The parameter count under ``PUBLISHED_CONVENTION`` (what the README's sizes count)."""
    h = cfg.text.hidden_size
    count = sum(count_parameters(m) for m in (model.visual, model.text_encoder, model.fusion, model.decoder))
    if model.visn_fc is not None:
        count += count_parameters(model.visn_fc) + count_parameters(model.visn_norm)
    connected = sum(layer.crossattention is None for layer in model.fusion.encoder.layer)
    count += connected * (4 * h * h + 6 * h)  # q, k, v, dense + biases, LayerNorm
    return count + cfg.vision.width * CLIP_EMBED_DIM.get(cfg.vision.width, cfg.vision.width)


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
        "published_convention_total": published_size(cfg, model),
        "published_convention": PUBLISHED_CONVENTION,
        "modules": modules,
        "momentum_teacher": count_parameters(teacher),
        "convention": COUNTING_CONVENTION,
    }
