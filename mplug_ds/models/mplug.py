"""The mPLUG model: CLIP ViT + BERT text encoder + skip-connected fusion + prefix-LM decoder + heads."""
from __future__ import annotations

from typing import Callable

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


class MPLUG(nn.Module):
    """All mPLUG parts; objectives and task heads call its encode/fuse methods.

    ``teacher=True`` builds only what a momentum teacher needs (no decoder, ITM head or temperature).
    Parameter names: ``visual.*`` (the ViT; its own learning rate), ``visn_fc``/``visn_norm`` (ViT-L → text width,
    only when the widths differ), ``text_encoder.*``, ``fusion.*``, ``decoder.*``, ``mlm_head.*``,
    ``vision_proj``/``text_proj`` (to the contrastive space), ``itm_head``, ``temp``, and ``patch_predictor`` (TiMix,
    only with ``cfg.patch_predictor_layer``; trained from scratch, so it is not under ``visual.*`` and its lower LR).
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

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_proj.weight.dtype

    def encode_image(self, images: torch.Tensor, patch_mix: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> torch.Tensor:
        """Image tokens ``(B, 1 + patches, H)`` at the text width (token 0 = CLS); ``patch_mix`` rewrites the patch
        embeddings first (TiMix's token-space mixing, see ``VisionEncoder.forward``)."""
        return self._to_text_width(self.visual(images, patch_mix=patch_mix))

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
