"""Classification metric (NLVR2, SNLI-VE): accuracy overall and per split, the majority-class and text-only baselines."""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Mapping, Sequence


def classification_accuracy(predictions: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``acc`` over all predictions, ``acc/<split>`` per split, and ``num_samples``.

    Each prediction holds the integer ``pred`` and ``label`` and optionally its ``split``.
    """
    if not predictions:
        return {}
    by_split: dict[str, list[bool]] = defaultdict(list)
    for p in predictions:
        by_split[str(p.get("split") or "all")].append(p["pred"] == p["label"])
    hits = [h for split in by_split.values() for h in split]
    metrics = {"acc": sum(hits) / len(hits), "num_samples": float(len(hits))}
    for split, split_hits in sorted(by_split.items()):
        metrics[f"acc/{split}"] = sum(split_hits) / len(split_hits)
    return metrics


def majority_baseline(predictions: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy of always answering the evaluation set's most frequent label (``acc``) — the best constant
    predictor, chosen with knowledge of the evaluation labels, so it favours the baseline."""
    if not predictions:
        return {}
    counts = Counter(p["label"] for p in predictions)
    return {"acc": max(counts.values()) / len(predictions)}


def text_only_baseline(predictions: Sequence[dict[str, Any]], label_of_text: Mapping[str, int],
                       fallback: int | None) -> dict[str, float]:
    """Accuracy of answering each prediction's ``text`` with its most frequent training label (``fallback``, the
    most frequent training label, for texts never seen in training): what a model that ignores the images reaches
    (``text_only``). Empty without training labels."""
    if not predictions or fallback is None:
        return {}
    hits = sum(label_of_text.get(p["text"], fallback) == p["label"] for p in predictions)
    return {"text_only": hits / len(predictions)}
