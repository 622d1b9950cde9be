"""Classification metric (NLVR2, SNLI-VE): accuracy overall and per split, and the majority-class baseline."""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Sequence


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
