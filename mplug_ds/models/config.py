"""Model configuration: the named mPLUG sizes live as YAML under ``mplug_ds/configs/models``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from mplug_ds.config import ConfigError, load_config

AttnBackend = Literal["sdpa", "flash_attn", "eager"]


@dataclass
class VisionConfig:
    """CLIP ViT image tower (OpenAI layout: pre-LN blocks, ln_pre/ln_post, QuickGELU)."""

    image_size: int = 256
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    attn_dropout: float = 0.0
    layer_norm_eps: float = 1e-5


@dataclass
class TextConfig:
    """BERT widths shared by the text encoder, the fusion layers and the decoder."""

    vocab_size: int = 30522
    hidden_size: int = 768
    heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attn_dropout: float = 0.1
    initializer_range: float = 0.02


@dataclass
class ModelConfig:
    """One mPLUG model: vision tower, text encoder, skip-connected fusion, prefix-LM decoder and heads."""

    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    text_encoder_layers: int = 6
    fusion_layers: int = 6
    fusion_stride: int = 3
    # "official": connected layer at fusion-local j != 0 with j % stride == 0 (what released checkpoints ran);
    # "paper": `stride` co-attention layers then one connected layer, repeated.
    fusion_schedule: Literal["official", "paper"] = "official"
    decoder_layers: int = 12
    embed_dim: int = 256
    temp: float = 0.07
    attn_backend: AttnBackend = "sdpa"
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.text.hidden_size % self.text.heads or self.vision.width % self.vision.heads:
            raise ConfigError(f"model '{self.name}': hidden sizes must be divisible by the number of heads")
        if self.vision.image_size % self.vision.patch_size:
            raise ConfigError(
                f"model '{self.name}': vision.image_size {self.vision.image_size} is not a multiple of "
                f"vision.patch_size {self.vision.patch_size}")
        if self.fusion_stride < 1:
            raise ConfigError(f"model '{self.name}': fusion_stride must be >= 1")


def load_model_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> ModelConfig:
    """Load a named model config (e.g. ``mplug.en.base``, ``tiny``) or a YAML path, with ``key=value`` overrides."""
    return load_config(ModelConfig, "models", name_or_path, overrides)
