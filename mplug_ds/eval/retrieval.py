"""Image–text retrieval metrics (TR / IR R@1/5/10 and their mean, median and mean rank) from ranked candidate
lists."""
from __future__ import annotations

import statistics
from typing import Sequence

RECALL_KS = (1, 5, 10)


def retrieval_recalls(image_ranking: Sequence[Sequence[int]], text_ranking: Sequence[Sequence[int]],
                      text_to_image: Sequence[int]) -> dict[str, float]:
    """Recall@K in both directions, in percent (the convention of the published tables).

    ``image_ranking[i]``: text indices for image i, best first (at least the top 10 needed);
    ``text_ranking[t]``: image indices for text t, best first; ``text_to_image[t]``: the image of text t.
    TR@K (text retrieval, image → text): an image counts when any of its texts is in its top K.
    IR@K (image retrieval, text → image): a text counts when its image is in its top K.
    ``r_mean`` is the mean of the six recalls; ``tr_mean``/``ir_mean`` of each direction.
    """
    if len(text_ranking) != len(text_to_image):
        raise ValueError(f"{len(text_ranking)} text rankings for {len(text_to_image)} texts")
    texts_of: list[set[int]] = [set() for _ in image_ranking]
    for t, i in enumerate(text_to_image):
        texts_of[i].add(t)
    out: dict[str, float] = {}
    for k in RECALL_KS:
        out[f"tr_r{k}"] = 100.0 * sum(bool(texts_of[i] & set(r[:k])) for i, r in enumerate(image_ranking)) / max(
            1, len(image_ranking))
    for k in RECALL_KS:
        out[f"ir_r{k}"] = 100.0 * sum(text_to_image[t] in r[:k] for t, r in enumerate(text_ranking)) / max(
            1, len(text_ranking))
    out["tr_mean"] = sum(out[f"tr_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    out["ir_mean"] = sum(out[f"ir_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    return out


def first_hit_ranks(rankings: Sequence[Sequence[int]], positives: Sequence[set[int]],
                    fallback: Sequence[int]) -> list[int]:
    """Per query, the 1-based rank of its first positive in ``rankings[q]`` (the re-ranked candidates), or
    ``fallback[q]`` when none of them is a positive (its rank in the full ordering the candidates were cut from)."""
    ranks = []
    for q, ranked in enumerate(rankings):
        hit = next((r for r, candidate in enumerate(ranked, start=1) if candidate in positives[q]), None)
        ranks.append(hit if hit is not None else max(fallback[q], len(ranked) + 1))
    return ranks


def rank_summary(ranks: Sequence[int]) -> tuple[float, float]:
    """Median rank (MdR) and mean rank (MnR) of the first positives; lower is better, 1 is perfect."""
    return float(statistics.median(ranks)), float(statistics.fmean(ranks))


def chance_recalls(text_to_image: Sequence[int], num_images: int) -> dict[str, float]:
    """Expected R@K (percent) of a random ranking: TR@K = P(one of the image's texts in K random of M texts),
    averaged over images; IR@K = K / N."""
    num_texts = len(text_to_image)
    counts = [0] * num_images
    for i in text_to_image:
        counts[i] += 1
    out: dict[str, float] = {}
    for k in RECALL_KS:
        miss = []
        for c in counts:  # P(none of c positives among k draws without replacement from num_texts)
            p = 1.0
            for j in range(min(k, num_texts)):
                p *= max(0.0, (num_texts - c - j) / (num_texts - j))
            miss.append(p)
        out[f"tr_r{k}"] = 100.0 * (1 - sum(miss) / max(1, num_images))
        out[f"ir_r{k}"] = 100.0 * min(1.0, k / max(1, num_images))
    out["tr_mean"] = sum(out[f"tr_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    out["ir_mean"] = sum(out[f"ir_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    return out
