"""CLIP ViT image tower (OpenAI layout) on timm's VisionTransformer.

timm supplies the modules, the forward (its public ``forward_features``, or ``forward_intermediates`` for the
hidden-state tap after block k that the TiMix patch predictor reads), per-block activation checkpointing
(``set_grad_checkpointing``) and OpenAI/open_clip weight conversion. Attention goes through
``mplug_ds.models.attention``.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from timm.layers import LayerNorm, resample_abs_pos_embed
from timm.layers.attention import Attention as TimmAttention
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from mplug_ds.models.attention import attention
from mplug_ds.models.config import VisionConfig


class ClipAttention(TimmAttention):
    """timm's fused-qkv attention, computed by the project's attention function (``backend`` set per subclass)."""

    backend = "sdpa"

    @classmethod
    def with_backend(cls, backend: str) -> type["ClipAttention"]:
        """The subclass timm instantiates for one attention backend (timm takes a class, not a partial)."""
        return type(f"ClipAttention_{backend}", (cls,), {"backend": backend})

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        drop = self.attn_drop.p if self.training else 0.0
        x = attention(q, k, v, dropout_p=drop, backend=self.backend)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class VisionEncoder(nn.Module):
    """Images ``(B, 3, R, R)`` → all tokens after ``ln_post`` ``(B, 1 + (R/P)², W)``; no projection."""

    def __init__(self, cfg: VisionConfig, attn_backend: str = "sdpa", grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = VisionTransformer(
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.layers,
            num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, pre_norm=True, num_classes=0, global_pool="",
            norm_layer=partial(LayerNorm, eps=cfg.layer_norm_eps), act_layer="quick_gelu",
            attn_drop_rate=cfg.attn_dropout, attn_layer=ClipAttention.with_backend(attn_backend),
        )
        init_clip_weights(self.vit)
        self.vit.set_grad_checkpointing(grad_checkpointing)  # each block recomputed in backward (non-reentrant)

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (without the class token)."""
        return (self.cfg.image_size // self.cfg.patch_size) ** 2

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Patch-embedding tokens ``(B, (R/P)², W)`` in row-major patch order, before class token and positions.

        The embedding is one linear map per ``P×P`` pixel patch, so moving patch tokens here is the same as moving
        the pixel patches (TiMix mixes in either space).
        """
        return self.vit.patch_embed(images.to(self.vit.pos_embed.dtype))

    def forward(self, images: torch.Tensor, tap_layer: int | None = None, stop_after: int | None = None,
                patch_mix: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """Encode images; with ``tap_layer=k`` also return the hidden states after block k (0-based).

        ``stop_after=k``: return only the hidden states after block k (later blocks and ``ln_post`` are not run).
        ``patch_mix``: a function applied to the patch embeddings ``(B, (R/P)², W)`` before the class token and
        positions are added (TiMix's token-space mixing; a hook on timm's patch-embedding module).
        """
        images = images.to(self.vit.pos_embed.dtype)
        hook = None
        if patch_mix is not None:
            hook = self.vit.patch_embed.register_forward_hook(lambda module, args, out: patch_mix(out))
        try:
            if stop_after is not None:
                [(patches, prefix)] = self.vit.forward_intermediates(
                    images, indices=[stop_after], return_prefix_tokens=True, output_fmt="NLC", stop_early=True,
                    intermediates_only=True)
                return torch.cat([prefix, patches], dim=1)
            if tap_layer is None:
                return self.vit.forward_features(images)
            x, [(patches, prefix)] = self.vit.forward_intermediates(
                images, indices=[tap_layer], return_prefix_tokens=True, output_fmt="NLC")
            return x, torch.cat([prefix, patches], dim=1)
        finally:
            if hook is not None:
                hook.remove()


@torch.no_grad()
def init_clip_weights(vit: VisionTransformer) -> None:
    """OpenAI CLIP's from-scratch initialisation of the image tower.

    Class and positional embeddings ~ N(0, W^-1/2), fused q/k/v Xavier-uniform (as ``nn.MultiheadAttention``),
    other linears PyTorch's default. timm's ViT default (class token std 1e-6, all weights std 0.02) leaves the
    class token almost independent of the image at step 0, which stalls contrastive learning from scratch.
    Loading pretrained CLIP weights overwrites all of this.
    """
    scale = vit.embed_dim ** -0.5
    nn.init.normal_(vit.cls_token, std=scale)
    nn.init.normal_(vit.pos_embed, std=scale)
    for block in vit.blocks:
        nn.init.xavier_uniform_(block.attn.qkv.weight)
        nn.init.zeros_(block.attn.qkv.bias)
        for linear in (block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            linear.reset_parameters()


def convert_clip_state_dict(state_dict: dict[str, torch.Tensor], encoder: VisionEncoder) -> dict[str, torch.Tensor]:
    """Map an OpenAI-CLIP / open_clip state dict (``visual.*`` keys, or a bare visual tower) onto ``encoder.vit``.

    The positional embedding is resized to the encoder's grid with 2-D bilinear interpolation, class row kept
    (the mPLUG convention). The CLIP text tower and the ``proj`` matrix are dropped.
    """
    if not any(k.startswith("visual.") for k in state_dict):
        state_dict = {f"visual.{k}": v for k, v in state_dict.items()}
    converted = checkpoint_filter_fn(state_dict, encoder.vit, interpolation="bilinear", antialias=False,
                                     align_corners=False)
    return {k: v for k, v in converted.items() if not k.startswith("head.")}


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a ``(1, 1 + g², W)`` ViT positional embedding to ``grid × grid`` (bilinear, class row kept)."""
    old = int(round((pos.shape[1] - 1) ** 0.5))
    return resample_abs_pos_embed(pos, new_size=[grid, grid], old_size=[old, old], num_prefix_tokens=1,
                                  interpolation="bilinear", antialias=False)
