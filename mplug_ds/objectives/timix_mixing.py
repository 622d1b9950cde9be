"""TiMix's text-aware mixing (timix_algorithm.md §5): relevance scores → windows → mixed patches → soft targets.

Every function works on a whole batch at once. Patch index ``n = row·S + col`` on the ``S×S`` grid (the patch
embedding's flatten order). Image ``i`` of a batch is the *target* of mixed image ``i``; ``partners[i]`` is its
*source*: the least relevant ``k×k`` window of the target is replaced by the most relevant ``k×k`` window of the
source (the pasted block keeps its internal layout and lands at the target window's position).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Pairing = Literal["flip", "derangement"]
LabelMode = Literal["area_pred", "area_onehot", "relevance_onehot", "relevance_pred"]
LABEL_MODES = ("area_pred", "area_onehot", "relevance_onehot", "relevance_pred")
EPS = 1e-6


def side_range(grid: int, min_ratio: float, max_ratio: float) -> tuple[int, int]:
    """Smallest and largest window side: ``⌊grid·ratio⌋`` clamped to 1 … grid−1 (a window never covers the image)."""
    k_max = min(grid - 1, math.floor(grid * max_ratio))
    k_min = min(max(1, math.floor(grid * min_ratio)), k_max)
    if k_max < 1:
        raise ValueError(f"a {grid}×{grid} patch grid is too small to mix (needs at least 2×2)")
    return k_min, k_max


def draw_sides(batch: int, k_min: int, k_max: int, per_sample: bool, device: torch.device | None = None
               ) -> torch.Tensor:
    """Window sides ``(B,)`` uniform in ``k_min … k_max``: one for the whole batch, or one per sample."""
    n = batch if per_sample else 1
    sides = torch.randint(k_min, k_max + 1, (n,), device=device)
    return sides if per_sample else sides.expand(batch).clone()


def draw_partners(batch: int, pairing: Pairing, device: torch.device | None = None) -> torch.Tensor:
    """Source image of each target ``(B,)``.

    ``flip``: ``i ↔ B−1−i`` (the reference; with odd ``B`` the middle image is its own source and stays unmixed).
    ``derangement``: a random cycle through a random order, so no image is its own source for ``B ≥ 2``.
    """
    if pairing == "flip" or batch < 2:
        return torch.arange(batch - 1, -1, -1, device=device)
    if pairing != "derangement":
        raise ValueError(f"unknown pairing '{pairing}' (flip | derangement)")
    order = torch.randperm(batch, device=device)
    partners = torch.empty_like(order)
    partners[order] = order.roll(-1)
    return partners


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Per-row z-score; constant rows become 0 instead of NaN (the reference divided by a zero std)."""
    scores = scores.float()
    centred = scores - scores.mean(dim=-1, keepdim=True)
    return centred / (centred.std(dim=-1, keepdim=True) + EPS)


def window_sums(scores: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
    """Sums of every ``k×k`` window, ``k = sides[b]``, of score maps ``(B, S, S)``, indexed by top-left corner.

    Returns ``(B, S, S)`` float64; corners where the window would leave the grid hold NaN. Computed from one
    summed-area table, so different sides per sample cost the same as one side.
    """
    b, s, _ = scores.shape
    table = F.pad(scores.double().cumsum(1).cumsum(2), (1, 0, 1, 0))  # (B, S+1, S+1)
    pos = torch.arange(s, device=scores.device)
    k = sides.to(scores.device).view(b, 1)
    r0, r1 = pos.view(1, s).expand(b, s), (pos.view(1, s) + k).clamp(max=s)
    rows = torch.arange(b, device=scores.device).view(b, 1, 1)

    def at(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return table[rows, r[:, :, None], c[:, None, :]]

    sums = at(r1, r1) - at(r0, r1) - at(r1, r0) + at(r0, r0)
    valid = (pos.view(1, s) <= s - k)  # (B, S): corner row/col fits the window
    return sums.masked_fill(~(valid[:, :, None] & valid[:, None, :]), float("nan"))


def best_windows(scores: torch.Tensor, sides: torch.Tensor, largest: bool) -> torch.Tensor:
    """Top-left corner ``(B, 2)`` (row, col) of the window with the largest (or smallest) score sum.

    ``scores`` is ``(B, N)`` in patch order. Ties go to the first corner in row-major order.
    """
    b, n = scores.shape
    s = math.isqrt(n)
    sums = window_sums(scores.view(b, s, s), sides).view(b, n)
    fill = float("-inf") if largest else float("inf")
    sums = torch.nan_to_num(sums, nan=fill)
    best = sums.argmax(dim=1) if largest else sums.argmin(dim=1)
    return torch.stack([best // s, best % s], dim=1)


@dataclass
class MixPlan:
    """Where every mixed image takes each of its patches from.

    ``partners`` (B,) source image of each target; ``sides`` (B,) window side (0: not mixed); ``target``/``source`` (B, 2)
    top-left corners of the replaced and the pasted window; ``inside`` (B, N) the target window's patches;
    ``src_image``/``src_patch`` (B, N) the image and patch each mixed patch is copied from.
    """

    partners: torch.Tensor
    sides: torch.Tensor
    target: torch.Tensor
    source: torch.Tensor
    inside: torch.Tensor
    src_image: torch.Tensor
    src_patch: torch.Tensor


def plan_mix(scores: torch.Tensor, sides: torch.Tensor, partners: torch.Tensor) -> MixPlan:
    """Least relevant window of each target, most relevant window of its source, and the patch map between them.

    ``scores`` ``(B, N)``: per-patch relevance of each image to its own caption (higher = more relevant).
    """
    b, n = scores.shape
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"scores have {n} patches per image, not a square grid")
    partners = partners.to(scores.device)
    own = torch.arange(b, device=scores.device)
    sides = sides.to(scores.device).masked_fill(partners == own, 0)  # an image that is its own source stays as is
    target = best_windows(scores, sides.clamp_min(1), largest=False)
    source = best_windows(scores[partners], sides.clamp_min(1), largest=True)
    pos = torch.arange(n, device=scores.device)
    row, col = (pos // s).view(1, n), (pos % s).view(1, n)
    dr, dc = row - target[:, :1], col - target[:, 1:]
    k = sides.view(b, 1)
    inside = (dr >= 0) & (dr < k) & (dc >= 0) & (dc < k)
    pasted = (source[:, :1] + dr) * s + (source[:, 1:] + dc)
    src_patch = torch.where(inside, pasted, pos.view(1, n))
    src_image = torch.where(inside, partners.view(b, 1), own.view(b, 1))
    return MixPlan(partners, sides, target, source, inside, src_image, src_patch)


def mix_tokens(tokens: torch.Tensor, plan: MixPlan) -> torch.Tensor:
    """Mixed patch tokens ``(B, N, D)`` from patch tokens ``(B, N, D)`` (e.g. patch embeddings)."""
    return tokens[plan.src_image, plan.src_patch]


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, R, R)`` → ``(B, N, C·P·P)`` pixel patches in patch order."""
    b, c, r, _ = images.shape
    s = r // patch
    return images.reshape(b, c, s, patch, s, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, s * s, c * patch * patch)


def unpatchify(patches: torch.Tensor, channels: int, patch: int) -> torch.Tensor:
    """Inverse of ``patchify``."""
    b, n, _ = patches.shape
    s = math.isqrt(n)
    return patches.reshape(b, s, s, channels, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(
        b, channels, s * patch, s * patch)


def mix_pixels(images: torch.Tensor, plan: MixPlan, patch: int) -> torch.Tensor:
    """Mixed images ``(B, C, R, R)``: the planned patch copy done on ``P×P`` pixel patches."""
    return unpatchify(mix_tokens(patchify(images, patch), plan), images.shape[1], patch)


def source_share(plan: MixPlan, mode: LabelMode, probs: torch.Tensor | None = None) -> torch.Tensor:
    """λ ``(B,)``: the share of mixed image ``i`` that belongs to its source's caption.

    ``area_*``: the pasted area ``k²/N``. ``relevance_*``: the source's relevance mass pasted in, over that plus the
    target's relevance mass kept (``probs`` (B, N): per-patch probability of being relevant to the own caption).
    """
    n = plan.inside.shape[1]
    if mode.startswith("area"):
        return plan.sides.float() ** 2 / n
    if probs is None:
        raise ValueError(f"label_mode '{mode}' needs relevance probabilities")
    probs = probs.float()
    kept = (probs * ~plan.inside).sum(dim=1)
    pasted = (probs[plan.src_image, plan.src_patch] * plan.inside).sum(dim=1)
    return pasted / (pasted + kept + EPS)


def mixed_targets(share: torch.Tensor, partners: torch.Tensor, base_i2t: torch.Tensor | None = None,
                  base_t2i: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets ``(Y_i2t, Y_t2i)`` (each ``(N, N)``, rows sum to 1) for mixed images against original texts.

    Indices are global: mixed image ``m`` (row ``m`` of ``share``/``partners``) mixes target ``m`` with source
    ``partners[m]`` at source share ``share[m]``. ``base_*`` are the distributions the mixture starts from
    (``None`` = one-hot ground truth; else the model's row-softmax predictions on the unmixed batch):
    ``Y_i2t[m] = (1−λ_m)·Q_i2t[m] + λ_m·Q_i2t[partners[m]]`` and
    ``Y_t2i[t, m] ∝ (1−λ_m)·Q_t2i[t, m] + λ_m·Q_t2i[t, partners[m]]``.
    """
    n = share.shape[0]
    share = share.float().view(n, 1)
    eye = torch.eye(n, device=share.device)
    q_i2t = eye if base_i2t is None else base_i2t.float()
    q_t2i = eye if base_t2i is None else base_t2i.float()
    y_i2t = (1 - share) * q_i2t + share * q_i2t[partners]
    y_t2i = ((1 - share) * q_t2i.t() + share * q_t2i.t()[partners]).t()
    y_t2i = y_t2i / y_t2i.sum(dim=1, keepdim=True).clamp_min(EPS)
    return y_i2t, y_t2i
