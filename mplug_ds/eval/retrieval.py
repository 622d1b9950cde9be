"""Image–text retrieval metrics (TR / IR R@1/5/10 and their mean) from ranked candidate lists."""
from __future__ import annotations

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
