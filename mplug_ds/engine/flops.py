"""Analytic FLOPs of one pre-training sample, for achieved TFLOP/s and MFU.

Convention (as in the MFU literature): model FLOPs = 2 × multiply-accumulates of the matmuls (projections,
FFNs, attention scores and weighted sums, vocabulary heads); element-wise work, norms and softmax are not
counted; a backward costs 2 × its forward; activation recomputation is not counted (it lowers MFU honestly).
Per pre-training sample the online model runs: the ViT once, the text encoder 3 times (caption, masked caption,
prefix), the fusion encoder 5 times (ITM positive + 2 negatives, MLM, prefix LM), the decoder once, the MLM head
on the masked positions and the LM head on the target. The momentum teacher (forward only) runs the ViT, the text
encoder twice, the fusion encoder once and the MLM head.
"""
from __future__ import annotations

from dataclasses import dataclass

from mplug_ds.models.config import ModelConfig
from mplug_ds.models.fusion import connected_layers


@dataclass(frozen=True)
class TextLengths:
    """Token lengths of one pre-training sample (padded lengths, as the kernels see them)."""

    text: int = 30
    prefix: int = 30
    target: int = 30


def vit_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs of the ViT on one image (patch embedding + blocks)."""
    v = cfg.vision
    grid = v.image_size // v.patch_size
    n, w = grid * grid + 1, v.width
    per_block = 2 * n * (4 * w * w + 2 * w * int(v.mlp_ratio * w)) + 4 * n * n * w
    return 2 * grid * grid * 3 * v.patch_size ** 2 * w + v.layers * per_block


def bert_layer_flops(cfg: ModelConfig, tokens: int, memory: int = 0) -> float:
    """Forward FLOPs of one BERT layer on ``tokens``, with cross-attention to ``memory`` tokens if > 0."""
    h, i = cfg.text.hidden_size, cfg.text.intermediate_size
    flops = 2 * tokens * (4 * h * h + 2 * h * i) + 4 * tokens * tokens * h
    if memory:
        flops += 2 * tokens * 2 * h * h + 2 * memory * 2 * h * h + 4 * tokens * memory * h
    return flops


def image_tokens(cfg: ModelConfig) -> int:
    """Image tokens entering the text side (class token included)."""
    return (cfg.vision.image_size // cfg.vision.patch_size) ** 2 + 1


def fusion_flops(cfg: ModelConfig, text_len: int) -> float:
    """Forward FLOPs of one fusion pass (co-attention and connected layers)."""
    n_img = image_tokens(cfg)
    total = 0.0
    for connected in connected_layers(cfg.fusion_layers, cfg.fusion_stride, cfg.fusion_schedule):
        total += bert_layer_flops(cfg, n_img + text_len) if connected else bert_layer_flops(cfg, text_len, n_img)
    return total


def head_flops(cfg: ModelConfig, tokens: float) -> float:
    """Forward FLOPs of a BERT LM/MLM head on ``tokens`` positions."""
    h = cfg.text.hidden_size
    return 2 * tokens * (h * h + h * cfg.text.vocab_size)


def pretrain_flops_per_sample(cfg: ModelConfig, lengths: TextLengths = TextLengths(), distill: bool = True,
                              mlm_probability: float = 0.15) -> float:
    """Training FLOPs (forward + backward, plus the teacher's forward) for one image-text pair."""
    def text_enc(n: int) -> float:
        return cfg.text_encoder_layers * bert_layer_flops(cfg, n)

    visn = 0.0
    if cfg.vision.width != cfg.text.hidden_size:
        visn = 2 * image_tokens(cfg) * cfg.vision.width * cfg.text.hidden_size
    masked = mlm_probability * lengths.text
    decoder = cfg.decoder_layers * bert_layer_flops(cfg, lengths.target, image_tokens(cfg) + lengths.prefix)
    online = (vit_flops(cfg) + visn + 2 * text_enc(lengths.text) + text_enc(lengths.prefix)
              + 4 * fusion_flops(cfg, lengths.text) + fusion_flops(cfg, lengths.prefix)
              + decoder + head_flops(cfg, lengths.target) + head_flops(cfg, masked))
    teacher = (vit_flops(cfg) + visn + 2 * text_enc(lengths.text) + fusion_flops(cfg, lengths.text)
               + head_flops(cfg, masked)) if distill else 0.0
    return 3 * online + teacher


PEAK_TFLOPS = {  # dense bf16/fp16 tensor-core peaks
    "H100 SXM": 989.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0,
}


def device_peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s for a known GPU name (``torch.cuda.get_device_name``), else None."""
    name = device_name.upper()
    if "H100" in name:
        return PEAK_TFLOPS["H100 PCIe"] if "PCIE" in name else PEAK_TFLOPS["H100 SXM"]
    for key, peak in PEAK_TFLOPS.items():
        if key.split()[0] in name:
            return peak
    return None
