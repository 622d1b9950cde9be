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

    image_size: int = 256  # input image side in pixels
    patch_size: int = 16  # ViT patch side in pixels
    width: int = 768  # ViT hidden size
    layers: int = 12  # ViT blocks
    heads: int = 12  # ViT attention heads
    mlp_ratio: float = 4.0  # ViT MLP width / hidden size
    attn_dropout: float = 0.0  # ViT attention dropout
    layer_norm_eps: float = 1e-5  # ViT LayerNorm epsilon


@dataclass
class TextConfig:
    """BERT widths shared by the text encoder, the fusion layers and the decoder."""

    vocab_size: int = 30522  # WordPiece vocabulary size (bert-base-uncased)
    hidden_size: int = 768  # text, fusion and decoder hidden size
    heads: int = 12  # attention heads of the BERT blocks
    intermediate_size: int = 3072  # BERT MLP width
    max_position_embeddings: int = 512  # longest text the position embeddings cover
    type_vocab_size: int = 2  # BERT token-type embeddings
    layer_norm_eps: float = 1e-12  # BERT LayerNorm epsilon
    hidden_dropout: float = 0.1  # dropout after BERT attention and MLP outputs
    attn_dropout: float = 0.1  # BERT attention-probability dropout
    initializer_range: float = 0.02  # std of the BERT weight initialisation


@dataclass
class VideoConfig:
    """How clips go through the image model: every frame through the ViT, then these choices."""

    # concat: every frame's tokens (as published); mean: the frames' tokens averaged (one frame's worth); pool: each
    # frame's class token + its patch grid average-pooled by pool_size
    memory: Literal["concat", "mean", "pool"] = "concat"  # what fusion and the decoder read of a clip
    pool_size: int = 2  # memory=pool: patch grid pooling window (2: a quarter of the patch tokens per frame)
    temporal_embedding: bool = False  # a learned per-frame embedding added to the frame tokens (zero at init)
    max_frames: int = 16  # frames the temporal embedding covers


@dataclass
class ModelConfig:
    """One mPLUG model: vision tower, text encoder, skip-connected fusion, prefix-LM decoder and heads."""

    name: str = "custom"  # the size's name (informational; saved with the run)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    text_encoder_layers: int = 6  # BERT blocks of the unimodal text encoder
    fusion_layers: int = 6  # skip-connected fusion layers
    fusion_stride: int = 3  # co-attention layers per connected layer
    # "official": connected layer at fusion-local j != 0 with j % stride == 0 (what released checkpoints ran);
    # "paper": `stride` co-attention layers then one connected layer, repeated.
    fusion_schedule: Literal["official", "paper"] = "official"  # connected layers as released (official) or as published
    decoder_layers: int = 12  # prefix-LM decoder blocks
    embed_dim: int = 256  # contrastive (ITA) feature size
    temp: float = 0.07  # initial contrastive temperature (learned)
    attn_backend: AttnBackend = "sdpa"  # attention kernels: sdpa, flash_attn or eager
    grad_checkpointing: bool = False  # recompute block activations in backward (less memory, more compute)
    patch_predictor_layer: int | None = None  # TiMix: ViT block (0-based) the patch predictor reads; null: none
    video: VideoConfig = field(default_factory=VideoConfig)  # clips (video tasks)

    def __post_init__(self) -> None:
        if self.text.hidden_size % self.text.heads or self.vision.width % self.vision.heads:
            raise ConfigError(f"model '{self.name}': hidden sizes must be divisible by the number of heads")
        if self.vision.image_size % self.vision.patch_size:
            raise ConfigError(
                f"model '{self.name}': vision.image_size {self.vision.image_size} is not a multiple of "
                f"vision.patch_size {self.vision.patch_size}")
        if self.fusion_stride < 1:
            raise ConfigError(f"model '{self.name}': fusion_stride must be >= 1")
        grid = self.vision.image_size // self.vision.patch_size
        if self.video.max_frames < 1:
            raise ConfigError(f"model '{self.name}': video.max_frames must be >= 1, got {self.video.max_frames}")
        if self.video.memory == "pool" and (self.video.pool_size < 1 or grid % self.video.pool_size):
            raise ConfigError(f"model '{self.name}': video.pool_size {self.video.pool_size} must divide the "
                              f"{grid}x{grid} patch grid")
        layer = self.patch_predictor_layer
        if layer is not None and not 0 <= layer < self.vision.layers:
            raise ConfigError(f"model '{self.name}': patch_predictor_layer {layer} is outside the ViT's blocks "
                              f"0..{self.vision.layers - 1}")


def load_model_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> ModelConfig:
    """Load a named model config (e.g. ``mplug.en.base``, ``tiny``) or a YAML path, with ``key=value`` overrides."""
    return load_config(ModelConfig, "models", name_or_path, overrides)
