"""The mPLUG model: CLIP ViT + BERT text encoder + skip-connected fusion + prefix-LM decoder + heads.

Images ``(B, 3, S, S)`` and clips ``(B, T, 3, S, S)`` share every part: a clip's frames go through the ViT one by
one; its contrastive feature is the mean of the projected per-frame class tokens and its fusion / decoder memory
the frames' tokens concatenated (as published) or reduced (``cfg.video.memory``); an optional learned temporal
embedding, zero at initialisation, is added to each frame's tokens.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mplug_ds.models.config import ModelConfig, load_model_config
from mplug_ds.models.decoder import PrefixLMDecoder
from mplug_ds.models.fusion import FusionEncoder
from mplug_ds.models.patch_predictor import PatchPredictor
from mplug_ds.models.text import LMHead, TextEncoder, init_bert_weights
from mplug_ds.models.vision import VisionEncoder

TEMP_RANGE = (0.001, 0.5)


class Visual(NamedTuple):
    """An image's or a clip's tokens as fusion and the decoder read them, and its contrastive feature."""

    memory: torch.Tensor  # (B, M, H)
    feature: torch.Tensor  # (B, E), L2-normalised


class MPLUG(nn.Module):
    """All mPLUG parts; objectives and task heads call its encode/fuse methods.

    ``teacher=True`` builds only what a momentum teacher needs (no decoder, ITM head or temperature).
    Parameter names: ``visual.*`` (the ViT; its own learning rate), ``visn_fc``/``visn_norm`` (ViT-L → text width,
    only when the widths differ), ``text_encoder.*``, ``fusion.*``, ``decoder.*``, ``mlm_head.*``,
    ``vision_proj``/``text_proj`` (to the contrastive space), ``itm_head``, ``temp``, and ``patch_predictor`` (TiMix,
    only with ``cfg.patch_predictor_layer``; trained from scratch, so it is not under ``visual.*`` and its lower LR),
    ``temporal_pos_embed`` (only with ``cfg.video.temporal_embedding``; likewise trained from scratch).
    """

    def __init__(self, cfg: ModelConfig, teacher: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        t, backend, ckpt = cfg.text, cfg.attn_backend, cfg.grad_checkpointing
        self.visual = VisionEncoder(cfg.vision, backend, ckpt)
        if cfg.vision.width != t.hidden_size:
            self.visn_fc = nn.Linear(cfg.vision.width, t.hidden_size)
            self.visn_norm = nn.LayerNorm(t.hidden_size, eps=t.layer_norm_eps)
            self.visn_dropout = nn.Dropout(t.hidden_dropout)
        else:
            self.visn_fc = None
        self.text_encoder = TextEncoder(t, cfg.text_encoder_layers, backend)
        self.fusion = FusionEncoder(t, cfg.fusion_layers, cfg.fusion_stride, cfg.fusion_schedule, backend, ckpt)
        self.mlm_head = LMHead(t)
        self.vision_proj = nn.Linear(t.hidden_size, cfg.embed_dim)
        self.text_proj = nn.Linear(t.hidden_size, cfg.embed_dim)
        init_bert_weights(nn.ModuleList([self.text_encoder, self.fusion, self.mlm_head]), t.initializer_range)
        if not teacher:
            self.decoder = PrefixLMDecoder(t, cfg.decoder_layers, backend, ckpt)
            init_bert_weights(self.decoder, t.initializer_range)
            self.itm_head = nn.Linear(t.hidden_size, 2)
            # Shape (1,), not (): DeepSpeed cannot broadcast 0-dim parameters. Official checkpoints store ().
            self.temp = nn.Parameter(torch.tensor([cfg.temp]))
        # The teacher never runs the predictor: TiMix scores patches with the online model only.
        build_predictor = cfg.patch_predictor_layer is not None and not teacher
        self.patch_predictor = PatchPredictor(cfg.vision.width, t.hidden_size) if build_predictor else None
        video = cfg.video
        self.temporal_pos_embed = (nn.Parameter(torch.zeros(1, video.max_frames, 1, t.hidden_size))
                                   if video.temporal_embedding else None)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_proj.weight.dtype

    def encode_image(self, images: torch.Tensor, patch_mix: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> torch.Tensor:
        """Image tokens ``(B, 1 + patches, H)`` at the text width (token 0 = CLS); ``patch_mix`` rewrites the patch
        embeddings first (TiMix's token-space mixing, see ``VisionEncoder.forward``)."""
        return self._to_text_width(self.visual(images, patch_mix=patch_mix))

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame tokens ``(B, T, 1 + patches, H)`` of clips ``(B, T, 3, S, S)`` (each frame through the ViT like an
        image), plus the temporal embedding of each frame when the model has one."""
        b, t = frames.shape[:2]
        tokens = self.encode_image(frames.flatten(0, 1)).unflatten(0, (b, t))
        if self.temporal_pos_embed is not None:
            if t > self.temporal_pos_embed.shape[1]:
                raise ValueError(f"a clip of {t} frames, but the temporal embedding covers "
                                 f"{self.temporal_pos_embed.shape[1]} (model video.max_frames)")
            tokens = tokens + self.temporal_pos_embed[:, :t].to(tokens.dtype)
        return tokens

    def video_feature(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised contrastive feature of clips from their per-frame tokens: the mean over frames of each
        frame's projected class token ``(B, E)``."""
        return F.normalize(self.vision_proj(tokens[:, :, 0]).float().mean(dim=1), dim=-1)

    def video_memory(self, tokens: torch.Tensor) -> torch.Tensor:
        """What fusion and the decoder read of clips ``(B, M, H)`` from their per-frame tokens ``(B, T, N, H)``:
        all frames' tokens (``concat``: M = T·N), their mean over frames (``mean``: M = N) or each frame's class
        token and average-pooled patch grid (``pool``: M = T·(1 + N'/pool_size²))."""
        mode = self.cfg.video.memory
        if mode == "concat":
            return tokens.flatten(1, 2)
        if mode == "mean":
            return tokens.mean(dim=1)
        b, t, n, h = tokens.shape
        grid, k = int(round((n - 1) ** 0.5)), self.cfg.video.pool_size
        patches = tokens[:, :, 1:].reshape(b * t, grid, grid, h).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(patches, k).flatten(2).transpose(1, 2).reshape(b, t, -1, h)
        return torch.cat([tokens[:, :, :1], pooled], dim=2).flatten(1, 2)

    def encode_visual(self, pixels: torch.Tensor) -> Visual:
        """Memory and contrastive feature of images ``(B, 3, S, S)`` or clips ``(B, T, 3, S, S)`` (normalised)."""
        if pixels.dim() == 4:
            tokens = self.encode_image(pixels)
            return Visual(tokens, self.image_feature(tokens))
        tokens = self.encode_video(pixels)
        return Visual(self.video_memory(tokens), self.video_feature(tokens))

    def visual_memory(self, pixels: torch.Tensor) -> torch.Tensor:
        """``encode_visual``'s memory alone (the contrastive projection is not run)."""
        return self.encode_image(pixels) if pixels.dim() == 4 else self.video_memory(self.encode_video(pixels))

    def encode_image_tapped(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_image`` plus the ViT hidden states after the patch predictor's block ``(B, 1 + patches, W)``."""
        x, tapped = self.visual(images, tap_layer=self._predictor_layer())
        return self._to_text_width(x), tapped

    def encode_image_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """ViT hidden states after the patch predictor's block only (later blocks are not run)."""
        return self.visual(images, stop_after=self._predictor_layer())

    def patch_log_probs(self, hidden: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Per-patch log-probabilities ``(B, patches, 2)`` that each patch of ``hidden`` (tapped ViT states with the
        class token first) is relevant to the text whose unimodal states are ``text`` (its [CLS] is used)."""
        return self.patch_predictor(hidden[:, 1:], text[:, 0])

    def _predictor_layer(self) -> int:
        if self.patch_predictor is None:
            raise RuntimeError(f"model '{self.cfg.name}' has no patch predictor: set patch_predictor_layer "
                               "(TiMix sets it from timix.predictor_layer)")
        return self.cfg.patch_predictor_layer

    def _to_text_width(self, x: torch.Tensor) -> torch.Tensor:
        if self.visn_fc is not None:
            x = self.visn_dropout(self.visn_norm(self.visn_fc(x)))
        return x

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unimodal text states ``(B, L, H)``."""
        return self.text_encoder(ids, mask)

    def fuse(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Skip-connected fusion → ``(image_out, text_out)``."""
        return self.fusion(image, text, text_mask)

    @staticmethod
    def memory(image_out: torch.Tensor, text_out: torch.Tensor, text_mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder memory ``[image_out; text_out]`` and its mask (all image tokens visible)."""
        ones = text_mask.new_ones(text_mask.shape[0], image_out.shape[1])
        return torch.cat([image_out, text_out], dim=1), torch.cat([ones, text_mask], dim=1)

    def image_feature(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised contrastive feature of the image CLS token ``(B, E)``."""
        return F.normalize(self.vision_proj(image[:, 0]).float(), dim=-1)

    def text_feature(self, text: torch.Tensor) -> torch.Tensor:
        """L2-normalised contrastive feature of the text CLS token ``(B, E)``."""
        return F.normalize(self.text_proj(text[:, 0]).float(), dim=-1)

    def temperature(self) -> torch.Tensor:
        """The learnable contrastive temperature (a 0-dim tensor), clamped to [0.001, 0.5]."""
        return self.temp.float().clamp(*TEMP_RANGE).squeeze(0)


def build_model(cfg: ModelConfig | str) -> MPLUG:
    """Build an mPLUG model from a config or a config name (``mplug.en.base``, ``tiny`` …)."""
    return MPLUG(load_model_config(cfg) if isinstance(cfg, str) else cfg)
