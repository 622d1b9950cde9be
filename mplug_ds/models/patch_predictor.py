"""TiMix's text-aware patch predictor: is each ViT patch relevant to a caption? (timix_algorithm.md §3)

A side branch on the ViT hidden states after one block: it reads the patch tokens and the caption's text [CLS]
state and returns per-patch log-probabilities of (irrelevant, relevant). It never changes the ViT's stream.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchPredictor(nn.Module):
    """Patch tokens ``(B, N, C)`` + text [CLS] ``(B, T)`` → log-probabilities ``(B, N, 2)``; class 1 = relevant.

    Each patch is described by half of a projected token (local) and half of the mean over all patches
    (global), concatenated with the text state (projected to ``C`` when ``T != C``: ViT-L/14 under a
    BERT-base text encoder), then classified by a 3-layer MLP.
    """

    def __init__(self, vision_width: int, text_width: int) -> None:
        super().__init__()
        c = vision_width
        if c % 4:
            raise ValueError(f"patch predictor needs a vision width divisible by 4, got {c}")
        self.embed = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c), nn.GELU())
        self.text_proj = nn.Linear(text_width, c) if text_width != c else nn.Identity()
        self.classifier = nn.Sequential(nn.Linear(2 * c, c // 2), nn.GELU(), nn.Linear(c // 2, c // 4), nn.GELU(),
                                        nn.Linear(c // 4, 2))

    def forward(self, patches: torch.Tensor, text_cls: torch.Tensor) -> torch.Tensor:
        h = self.embed(patches)
        half = h.shape[-1] // 2
        local, pooled = h[..., :half], h[..., half:].mean(dim=1, keepdim=True).expand(-1, h.shape[1], -1)
        text = self.text_proj(text_cls.to(h.dtype))[:, None].expand(-1, h.shape[1], -1)
        return F.log_softmax(self.classifier(torch.cat([local, pooled, text], dim=-1)).float(), dim=-1)
