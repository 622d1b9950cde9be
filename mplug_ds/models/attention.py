"""The one attention function every module uses, with ``sdpa`` (default), ``flash_attn`` and ``eager`` backends."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # optional: pip install mplug_ds[flash] on a CUDA machine
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = flash_attn_varlen_func = None

BACKENDS = ("sdpa", "flash_attn", "eager")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Scaled dot-product attention over ``(B, H, L, D)`` tensors.

    ``key_mask`` is ``(B, Lk)``, true/1 for keys that may be attended. ``causal`` aligns the query block with the
    end of the key sequence (query i sees keys ``<= i + Lk - Lq``), which is what KV-cached decoding needs.
    Returns ``(B, H, Lq, D)``.
    """
    if backend == "sdpa":
        mask = _bool_mask(q, k, key_mask, causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if backend == "eager":
        return _eager(q, k, v, _bool_mask(q, k, key_mask, causal), dropout_p)
    if backend == "flash_attn":
        return _flash(q, k, v, key_mask, causal, dropout_p)
    raise ValueError(f"unknown attention backend '{backend}' (choose one of {', '.join(BACKENDS)})")


def _bool_mask(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None, causal: bool) -> torch.Tensor | None:
    """A boolean ``(B|1, 1, Lq, Lk)`` keep-mask, or None when every key is visible."""
    lq, lk = q.shape[-2], k.shape[-2]
    mask = None
    if key_mask is not None:
        mask = key_mask.bool()[:, None, None, :]
    if causal and lq > 1:
        tri = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        mask = tri[None, None] if mask is None else mask & tri
    return mask


def _eager(q, k, v, mask, dropout_p):
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1).to(v.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def _flash(q, k, v, key_mask, causal, dropout_p):
    if flash_attn_func is None:
        raise RuntimeError("attn_backend 'flash_attn' needs the flash-attn package (pip install 'mplug_ds[flash]'); "
                           "use attn_backend=sdpa, which picks PyTorch's flash kernels on GPU")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"attn_backend 'flash_attn' needs fp16/bf16 tensors, got {q.dtype}; use sdpa for fp32")
    b, h, lq, d = q.shape
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn layout (B, L, H, D)
    if key_mask is None or bool(key_mask.all()):
        return flash_attn_func(qt, kt, vt, dropout_p=dropout_p, causal=causal).transpose(1, 2)
    keep = key_mask.bool()
    lens_k = keep.sum(dim=1, dtype=torch.int32)
    cu_k = F.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))
    if causal:
        # Causal self-attention over padded text: queries are packed with the same mask so that the
        # bottom-right causal alignment is relative to each sequence's real length.
        if lq != k.shape[-2]:
            raise ValueError("flash_attn: a causal call with a key mask must be self-attention (Lq == Lk)")
        out = flash_attn_varlen_func(qt[keep], kt[keep], vt[keep], cu_k, cu_k, int(lens_k.max()),
                                     int(lens_k.max()), dropout_p=dropout_p, causal=True)
        full = out.new_zeros(b, lq, h, d)
        full[keep] = out
        return full.transpose(1, 2)
    # Padded keys, every query row kept.
    cu_q = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(qt.reshape(b * lq, h, d), kt[keep], vt[keep], cu_q, cu_k, lq, int(lens_k.max()),
                                 dropout_p=dropout_p, causal=False)
    return out.reshape(b, lq, h, d).transpose(1, 2)
