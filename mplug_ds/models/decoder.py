"""Prefix-LM text decoder: causal BERT layers with cross-attention to a memory, LM head tied to its embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mplug_ds.models.config import TextConfig
from mplug_ds.models.text import BertStack, KVCache, LMHead


class PrefixLMDecoder(nn.Module):
    """``bert`` (causal self-attn → cross-attn to memory → FFN) + ``cls`` LM head (decoder weight = word embeddings)."""

    def __init__(self, cfg: TextConfig, num_layers: int, backend: str = "sdpa",
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.bert = BertStack(cfg, num_layers, cross_width=cfg.hidden_size, causal=True, backend=backend,
                              grad_checkpointing=grad_checkpointing)
        self.cls = LMHead(cfg)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, memory: torch.Tensor,
                memory_mask: torch.Tensor | None, cache: list[KVCache] | None = None) -> torch.Tensor:
        """Next-token logits ``(B, L, V)`` for ``ids``; with ``cache``, only the new ids are run."""
        return self.cls(self.bert(ids, mask, memory, memory_mask, cache))

    def new_cache(self) -> list[KVCache]:
        """An empty KV cache (one dict per layer) for incremental decoding."""
        return [{} for _ in self.bert.encoder.layer]

    def token_nll(self, ids: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor,
                  memory_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced negative log-likelihood of ``ids[:, 1:]`` given ``ids[:, :-1]``.

        Returns ``(nll, valid)``, both ``(B, L-1)``; ``valid`` marks the non-padding target positions.
        """
        hidden = self.bert(ids, mask, memory, memory_mask)[:, :-1]
        targets = ids[:, 1:]
        valid = mask[:, 1:].bool()
        # The vocabulary-wide head runs only where there is a target: padding is most of a max_len-padded batch.
        logits = self.cls(hidden[valid]).float()
        nll = F.cross_entropy(logits, targets[valid], reduction="none")
        return torch.zeros(valid.shape, dtype=nll.dtype, device=nll.device).masked_scatter(valid, nll), valid

    def lm_loss(self, ids: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor,
                memory_mask: torch.Tensor | None) -> torch.Tensor:
        """Mean token cross-entropy over every valid target token in the batch (prefix LM / captioning)."""
        nll, valid = self.token_nll(ids, mask, memory, memory_mask)
        return nll.sum() / valid.sum().clamp(min=1)
