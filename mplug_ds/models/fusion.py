"""Cross-modal skip-connected fusion: asymmetric co-attention layers and connected-attention layers.

Image tokens enter already at the text width (the model projects ViT-L features 1024 → 768 first).

* Co-attention layer: text self-attention → text-to-image cross-attention → FFN; the image stream passes by.
* Connected-attention layer: self-attention + FFN over ``[image; text]``; its image output is added back to
  the image stream (the cross-modal skip connection). It owns no cross-attention weights.

Which local layer j is connected is a config choice:
  ``official``: j != 0 and j % stride == 0 (what the released checkpoints ran; stride 6 with 6 layers → none);
  ``paper``:    every (stride + 1)-th layer, i.e. ``stride`` co-attention layers then one connected layer.
"""
from __future__ import annotations

import torch
from torch import nn

from mplug_ds.models.checkpointing import run_block
from mplug_ds.models.config import TextConfig
from mplug_ds.models.text import BertAttention, BertFeedForward, BertIntermediate, BertResidualOutput


def connected_layers(num_layers: int, stride: int, schedule: str) -> list[bool]:
    """For each fusion layer, whether it is a connected-attention layer."""
    if schedule == "official":
        return [j != 0 and j % stride == 0 for j in range(num_layers)]
    if schedule == "paper":
        return [(j + 1) % (stride + 1) == 0 for j in range(num_layers)]
    raise ValueError(f"unknown fusion_schedule '{schedule}' (official | paper)")


class FusionLayer(BertFeedForward):
    """One fusion layer; ``connected`` selects connected attention instead of co-attention."""

    def __init__(self, cfg: TextConfig, connected: bool, backend: str = "sdpa") -> None:
        super().__init__()
        self.connected = connected
        self.attention = BertAttention(cfg, backend=backend)
        self.crossattention = None if connected else BertAttention(cfg, backend=backend)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg)

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.connected:
            n_img = image.shape[1]
            mask = torch.cat([text_mask.new_ones(text_mask.shape[0], n_img), text_mask], dim=1)
            y = self.feed_forward(self.attention(torch.cat([image, text], dim=1), mask))
            return image + y[:, :n_img], y[:, n_img:]
        t = self.attention(text, text_mask)
        t = self.crossattention(t, None, image)
        return image, self.feed_forward(t)


class FusionEncoder(nn.Module):
    """``encoder.layer`` stack of fusion layers; returns ``(image_out, text_out)``."""

    def __init__(self, cfg: TextConfig, num_layers: int, stride: int, schedule: str, backend: str = "sdpa", grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            FusionLayer(cfg, connected, backend)
            for connected in connected_layers(num_layers, stride, schedule))
        self.grad_checkpointing = grad_checkpointing

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse image tokens ``(B, Li, H)`` with text states ``(B, Lt, H)`` under the text padding mask."""
        for layer in self.encoder.layer:
            image, text = run_block(layer, image, text, text_mask, enabled=self.grad_checkpointing)
        return image, text
