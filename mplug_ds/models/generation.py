"""Decoding over the KV-cached prefix-LM decoder: greedy, batched beam search and answer-list ranking.

One module serves every generative task: captions (beam 5, 8–25 tokens), VQA answers (beam 5, 1–10 tokens, or
ranking a candidate answer list) and grounding's four coordinate tokens (beam 1 over the bins, no end token).

Beam search keeps ``num_beams`` live hypotheses per sample. Each step scores every (beam, token) extension by its
summed log-probability and looks at the best ``2 × num_beams``: an end token among the best ``num_beams`` closes a
hypothesis (scored by its summed log-probability over the GNMT length penalty ``((5 + n) / 6) ** α``, n = tokens
generated including the end token); the best non-end extensions become the next live beams. With the KV cache only
the newest token runs through the decoder and the cached self-attention keys/values follow their beams.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mplug_ds.distributed import get_world_size
from mplug_ds.models.decoder import PrefixLMDecoder

NEG_INF = float("-inf")


@dataclass
class BeamConfig:
    """Beam search settings (the published ones: VQA 5 beams, 1–10 tokens; captions 5 beams, 8–25 tokens)."""

    num_beams: int = 5
    min_length: int = 1  # tokens generated before the end token may be chosen
    max_length: int = 10  # tokens generated at most, the end token included
    length_penalty: float = 0.6  # α of ((5 + n) / 6) ** α; 0 ranks finished hypotheses by summed log-probability
    early_stop: bool = True  # a sample stops once its best extension is the end token (or num_beams finished);
    # False: it stops only when no live beam can still beat its num_beams finished hypotheses
    no_repeat_ngram: int = 0  # n > 0: never generate an n-gram already in the sequence (prompt included)


@dataclass
class BeamOutput:
    """Per sample: the best hypothesis' generated tokens (end token included when it finished) and its score."""

    tokens: list[list[int]]
    scores: torch.Tensor  # (B,) length-penalised summed log-probability


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length normaliser ``((5 + length) / 6) ** alpha``."""
    return ((5 + length) / 6) ** alpha


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


def _log_probs(logits: torch.Tensor, token_range: tuple[int, int] | None) -> torch.Tensor:
    """fp32 log-softmax over the vocabulary, or over ``[lo, hi)`` only (every other id gets −inf)."""
    logits = logits.float()
    if token_range is not None:
        lo, hi = token_range
        outside = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
        outside[lo:hi] = False
        logits = logits.masked_fill(outside, NEG_INF)
    return logits.log_softmax(dim=-1)


def _ban_repeated_ngrams(logp: torch.Tensor, ids: torch.Tensor, n: int) -> None:
    """Set −inf for each row's tokens that would repeat an n-gram already in that row of ``ids`` (in place)."""
    if ids.shape[1] < n - 1 or n < 1:
        return
    for row, seq in enumerate(ids.tolist()):
        tail = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
        banned = {seq[j + n - 1] for j in range(len(seq) - n + 1) if tuple(seq[j:j + n - 1]) == tail}
        if banned:
            logp[row, list(banned)] = NEG_INF


def _reorder_cache(cache: list[dict] | None, rows: torch.Tensor) -> None:
    """Make every layer's cached self-attention keys/values follow the selected beams. The cross-attention cache
    needs no reordering: the beams of one sample share its memory and beams never move between samples."""
    for layer in cache or []:
        k, v = layer["self"]
        layer["self"] = (k[rows], v[rows])


@torch.no_grad()
def beam_search(decoder: PrefixLMDecoder, memory: torch.Tensor, memory_mask: torch.Tensor | None,
                prompt_ids: torch.Tensor, cfg: BeamConfig, eos_id: int | None,
                token_range: tuple[int, int] | None = None, use_cache: bool = True,
                sync_ranks: bool = True) -> BeamOutput:
    """Batched beam search from ``prompt_ids`` ``(B, Lp)`` (every row the same length, e.g. ``[CLS]``).

    ``memory`` ``(B, M, H)`` / ``memory_mask`` ``(B, M)`` are what the decoder cross-attends to. ``eos_id=None``
    generates exactly ``max_length`` tokens. ``token_range=(lo, hi)`` restricts generation to ids ``lo … hi−1``.
    With ``use_cache=False`` the whole prefix is recomputed each step (the reference path; same result).
    With ``sync_ranks`` every rank of a process group runs the same number of decoder steps (a ZeRO-3 forward is
    a collective), continuing while any rank still has a live sample.
    """
    b, k = prompt_ids.shape[0], cfg.num_beams
    if k < 1 or cfg.max_length < 1 or cfg.min_length > cfg.max_length:
        raise ValueError(f"beam search needs num_beams >= 1 and 1 <= max_length >= min_length, got {cfg}")
    device = prompt_ids.device
    memory = memory.repeat_interleave(k, dim=0)
    memory_mask = None if memory_mask is None else memory_mask.repeat_interleave(k, dim=0)
    ids = prompt_ids.repeat_interleave(k, dim=0)  # (B·K, L): beam j of sample i is row i·K + j
    prompt_len = ids.shape[1]
    cum = torch.full((b, k), NEG_INF, device=device)
    cum[:, 0] = 0.0  # all beams start identical: only the first may extend at step 0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    done = [False] * b
    cache = decoder.new_cache() if use_cache else None
    step_input = ids
    base = torch.arange(b, device=device)[:, None] * k
    for t in range(cfg.max_length):
        mask = None if use_cache else torch.ones_like(ids)
        logp = _log_probs(decoder(step_input, mask, memory, memory_mask, cache)[:, -1], token_range)
        if eos_id is not None and t < cfg.min_length:
            logp[:, eos_id] = NEG_INF
        if cfg.no_repeat_ngram:
            _ban_repeated_ngrams(logp, ids, cfg.no_repeat_ngram)
        vocab = logp.shape[1]
        top_val, top_idx = (cum.view(-1, 1) + logp).view(b, k * vocab).topk(min(2 * k, k * vocab), dim=1)
        beam_of, token = top_idx // vocab, top_idx % vocab
        is_eos = token == eos_id if eos_id is not None else torch.zeros_like(token, dtype=torch.bool)
        norm = length_penalty(t + 1, cfg.length_penalty)
        if eos_id is not None:
            for i, r in (is_eos[:, :k] & top_val[:, :k].isfinite()).nonzero().tolist():
                if not done[i]:
                    prefix = ids[i * k + int(beam_of[i, r]), prompt_len:].tolist()
                    finished[i].append((float(top_val[i, r]) / norm, prefix + [eos_id]))
        cum, pick = top_val.masked_fill(is_eos, NEG_INF).topk(k, dim=1)  # best non-end extensions, sorted
        rows = (base + beam_of.gather(1, pick)).view(-1)
        new_tokens = token.gather(1, pick).view(-1, 1)
        ids = torch.cat([ids[rows], new_tokens], dim=1)
        _reorder_cache(cache, rows)
        step_input = new_tokens if use_cache else ids
        for i in range(b):
            if not done[i]:
                done[i] = _sample_done(finished[i], bool(is_eos[i, 0]), float(cum[i, 0]), t, cfg)
        if not _any_rank(not all(done), device, sync_ranks):
            break
    tokens, scores = [], []
    for i in range(b):
        hypotheses = list(finished[i])
        if not done[i] or not hypotheses:  # out of steps: live beams compete as they are
            for j in range(k):
                if torch.isfinite(cum[i, j]):
                    seq = ids[i * k + j, prompt_len:].tolist()
                    hypotheses.append((float(cum[i, j]) / length_penalty(len(seq), cfg.length_penalty), seq))
        score, seq = max(hypotheses, key=lambda h: h[0])
        tokens.append(seq)
        scores.append(score)
    return BeamOutput(tokens, torch.tensor(scores))


def _any_rank(flag: bool, device: torch.device, sync: bool) -> bool:
    """``flag`` on any rank of the process group (this rank's ``flag`` without one, or when ``sync`` is off)."""
    if not sync or get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _sample_done(finished: list[tuple[float, list[int]]], best_is_eos: bool, best_live: float, t: int,
                 cfg: BeamConfig) -> bool:
    """Whether a sample's search is over after step ``t``."""
    if best_live == NEG_INF:
        return True
    if cfg.early_stop:
        return best_is_eos or len(finished) >= cfg.num_beams
    if len(finished) < cfg.num_beams:
        return False
    # Log-probabilities only fall: a live beam ends at most at its current sum over the most favourable length.
    bound = max(best_live / length_penalty(n, cfg.length_penalty) for n in (t + 2, cfg.max_length))
    return min(s for s, _ in finished) >= bound


@torch.no_grad()
def rank_answers(decoder: PrefixLMDecoder, memory: torch.Tensor, memory_mask: torch.Tensor | None,
                 answer_ids: torch.Tensor, answer_mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each sample's answer from a candidate list (ALBEF's ranking): the ``k`` candidates whose first token
    is most probable after ``[CLS]``, re-scored by the log-probability of their whole sequence.

    ``answer_ids``/``answer_mask`` ``(N, La)`` are the tokenised candidates (``[CLS] answer [SEP] …``, as trained).
    Returns the chosen candidate index ``(B,)`` and its sequence log-probability ``(B,)``. Two decoder forwards
    per call, whatever the batch (ZeRO-3 lockstep holds).
    """
    b, n = memory.shape[0], answer_ids.shape[0]
    start = answer_ids[:1, :1].expand(b, 1)
    first = _log_probs(decoder(start, torch.ones_like(start), memory, memory_mask)[:, 0], None)
    k = min(k, n)
    top = first[:, answer_ids[:, 1]].topk(k, dim=1).indices  # (B, k) candidate indices
    ids, mask = answer_ids[top.view(-1)], answer_mask[top.view(-1)]
    memory_mask = None if memory_mask is None else memory_mask.repeat_interleave(k, dim=0)
    nll, _ = decoder.token_nll(ids, mask, memory.repeat_interleave(k, dim=0), memory_mask)
    score = -nll.sum(dim=1).view(b, k)
    best = score.argmax(dim=1, keepdim=True)
    return top.gather(1, best).squeeze(1), score.gather(1, best).squeeze(1)
