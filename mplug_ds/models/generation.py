"""Decoding over the KV-cached prefix-LM decoder."""
from __future__ import annotations

import torch

from mplug_ds.models.decoder import PrefixLMDecoder


@torch.no_grad()
def greedy_decode(decoder: PrefixLMDecoder, memory: torch.Tensor, memory_mask: torch.Tensor | None,
                  prompt_ids: torch.Tensor, max_new_tokens: int, eos_id: int, use_cache: bool = True
                  ) -> torch.Tensor:
    """Greedy generation from ``prompt_ids`` (``(B, Lp)``, e.g. ``[CLS]``); stops when every row emitted ``eos_id``.

    With ``use_cache`` each step runs only the newest token through the decoder (keys/values of earlier tokens
    and of the memory are cached); without it the whole sequence is recomputed each step (the reference path).
    Returns ``(B, Lp + n)`` ids; rows that finished early are padded with ``eos_id``.
    """
    ids = prompt_ids
    cache = decoder.new_cache() if use_cache else None
    step_input = ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        mask = None if use_cache else torch.ones_like(ids)
        logits = decoder(step_input, mask, memory, memory_mask, cache)[:, -1]
        next_ids = logits.argmax(dim=-1).masked_fill(done, eos_id)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        done |= next_ids == eos_id
        if bool(done.all()):
            break
        step_input = next_ids[:, None] if use_cache else ids
    return ids
