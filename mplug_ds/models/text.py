"""BERT building blocks (post-LN) shared by the text encoder, the fusion layers and the decoder.

Parameter names follow Hugging Face ``BertModel`` (``embeddings.*``, ``encoder.layer.N.attention.self.query`` …)
so BERT checkpoints and official mPLUG weights load by name. We do not reuse ``transformers``' BERT layers:
every module here must run the project's single attention function (sdpa / flash_attn / eager), support
cross-attention from a different width, and keep an explicit KV cache for incremental decoding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mplug_ds.models.attention import attention
from mplug_ds.models.checkpointing import run_block
from mplug_ds.models.config import TextConfig

KVCache = dict[str, tuple[torch.Tensor, torch.Tensor]]


class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type (always 0) embeddings, LayerNorm, dropout."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        """Embed ``(B, L)`` ids whose positions start at ``past_length``."""
        positions = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """q/k/v projections; keys and values may come from a context of another width (cross-attention)."""

    def __init__(self, cfg: TextConfig, kv_width: int | None = None, backend: str = "sdpa") -> None:
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width or cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(kv_width or cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attn_dropout
        self.backend = backend

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, H, L, D)`` for a context."""
        return self.split_heads(self.key(context)), self.split_heads(self.value(context))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, context: torch.Tensor | None = None,
                causal: bool = False, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Attend from ``x`` to ``context`` (default ``x``); ``kv`` gives precomputed keys/values instead."""
        q = self.split_heads(self.query(x))
        k, v = kv if kv is not None else self.project_kv(x if context is None else context)
        drop = self.dropout_p if self.training else 0.0
        out = attention(q, k, v, key_mask=key_mask, causal=causal, dropout_p=drop, backend=self.backend)
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, -1)


class BertResidualOutput(nn.Module):
    """``LayerNorm(residual + Dropout(Linear(x)))``: the post-LN output of an attention or FFN sub-layer."""

    def __init__(self, in_features: int, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class BertAttention(nn.Module):
    """Attention sub-layer: ``self`` (projections + attention) then ``output`` (dense, residual, LayerNorm)."""

    def __init__(self, cfg: TextConfig, kv_width: int | None = None, backend: str = "sdpa") -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width, backend)
        self.output = BertResidualOutput(cfg.hidden_size, cfg)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, context: torch.Tensor | None = None,
                causal: bool = False, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.output(self.self(x, key_mask, context, causal, kv), x)


class BertIntermediate(nn.Module):
    """FFN expansion with erf GELU."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertFeedForward(nn.Module):
    """Mixin: the FFN sub-layer of a BERT layer (``intermediate`` then ``output``)."""

    intermediate: BertIntermediate
    output: BertResidualOutput

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(x), x)


class BertLayer(BertFeedForward):
    """Self-attention (optionally causal), optional cross-attention to a context, FFN."""

    def __init__(self, cfg: TextConfig, cross_width: int | None = None, causal: bool = False,
                 backend: str = "sdpa") -> None:
        super().__init__()
        self.causal = causal
        self.attention = BertAttention(cfg, backend=backend)
        self.crossattention = BertAttention(cfg, cross_width, backend) if cross_width else None
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """One layer. With ``cache`` (decoding), new keys/values are appended to ``cache['self']`` and the
        context keys/values are computed once into ``cache['cross']``."""
        if cache is None:
            x = self.attention(x, mask, causal=self.causal)
        else:
            k, v = self.attention.self.project_kv(x)
            if "self" in cache:
                k = torch.cat([cache["self"][0], k], dim=2)
                v = torch.cat([cache["self"][1], v], dim=2)
            cache["self"] = (k, v)
            x = self.attention(x, mask, causal=self.causal, kv=(k, v))
        if self.crossattention is not None:
            kv = None
            if cache is not None:
                if "cross" not in cache:
                    cache["cross"] = self.crossattention.self.project_kv(context)
                kv = cache["cross"]
            x = self.crossattention(x, context_mask, context, kv=kv)
        return self.feed_forward(x)


class BertStack(nn.Module):
    """``embeddings`` + ``encoder.layer`` list, without pooler (a Hugging Face ``BertModel`` minus the pooler)."""

    def __init__(self, cfg: TextConfig, num_layers: int, cross_width: int | None = None, causal: bool = False,
                 backend: str = "sdpa", grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(cfg, cross_width, causal, backend) for _ in range(num_layers))
        self.grad_checkpointing = grad_checkpointing

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, cache: list[KVCache] | None = None) -> torch.Tensor:
        """Hidden states ``(B, L, H)``; ``cache`` (one dict per layer) enables incremental decoding."""
        past = 0 if not cache or "self" not in cache[0] else cache[0]["self"][0].shape[2]
        x = self.embeddings(input_ids, past_length=past)
        for i, layer in enumerate(self.encoder.layer):
            if cache is not None:
                x = layer(x, mask, context, context_mask, cache[i])
            else:
                x = run_block(layer, x, mask, context, context_mask, enabled=self.grad_checkpointing)
        return x


class TextEncoder(BertStack):
    """The unimodal bidirectional text encoder; the CLS row is the text's global feature."""

    def __init__(self, cfg: TextConfig, num_layers: int, backend: str = "sdpa") -> None:
        super().__init__(cfg, num_layers, backend=backend)


class LMHead(nn.Module):
    """BERT prediction head: ``predictions.transform`` (dense, GELU, LayerNorm) then ``predictions.decoder`` + bias."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.predictions = nn.Module()
        self.predictions.transform = nn.Module()
        self.predictions.transform.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.predictions.transform.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.predictions.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.predictions.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        t = self.predictions.transform
        h = t.LayerNorm(F.gelu(t.dense(hidden)))
        return self.predictions.decoder(h) + self.predictions.bias


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT initialisation: N(0, std) for Linear/Embedding, zero biases, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
