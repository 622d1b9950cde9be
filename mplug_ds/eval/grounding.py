"""Referring-expression grounding metric: Acc@IoU≥0.5 overall and per split, and trivial-box baselines."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch

from mplug_ds.eval.boxes import box_iou

IOU_THRESHOLD = 0.5


def grounding_accuracy(predictions: Sequence[dict[str, Any]], threshold: float = IOU_THRESHOLD) -> dict[str, float]:
    """``acc`` over all predictions and ``acc/<split>`` per split.

    Each prediction holds ``pred_box`` and ``gt_box`` (xyxy, same pixel frame: the original image) and
    ``split``. A prediction is correct when IoU ≥ ``threshold``.
    """
    if not predictions:
        return {}
    pred = torch.tensor([p["pred_box"] for p in predictions], dtype=torch.float64)
    gt = torch.tensor([p["gt_box"] for p in predictions], dtype=torch.float64)
    hit = (box_iou(pred, gt) >= threshold).tolist()
    by_split: dict[str, list[bool]] = defaultdict(list)
    for p, h in zip(predictions, hit):
        by_split[str(p.get("split") or "all")].append(h)
    metrics = {"acc": sum(hit) / len(hit), "num_samples": float(len(hit))}
    for split, hits in sorted(by_split.items()):
        metrics[f"acc/{split}"] = sum(hits) / len(hits)
    return metrics


def trivial_box_baselines(predictions: Sequence[dict[str, Any]], mean_size: tuple[float, float] | None = None,
                          threshold: float = IOU_THRESHOLD) -> dict[str, float]:
    """Acc@IoU≥0.5 of boxes that ignore the expression: the whole image, and a centred box of ``mean_size``
    (relative width, height; default: the evaluation set's mean ground-truth size, which favours the baseline).

    Each prediction needs ``gt_box`` and ``image_size`` (width, height) of the original image.
    """
    if not predictions:
        return {}
    gt = torch.tensor([p["gt_box"] for p in predictions], dtype=torch.float64)
    size = torch.tensor([p["image_size"] for p in predictions], dtype=torch.float64)
    w, h = size[:, 0], size[:, 1]
    whole = torch.stack([torch.zeros_like(w), torch.zeros_like(h), w, h], dim=1)
    if mean_size is None:
        rel_w = ((gt[:, 2] - gt[:, 0]) / w).mean()
        rel_h = ((gt[:, 3] - gt[:, 1]) / h).mean()
    else:
        rel_w, rel_h = (torch.tensor(v, dtype=torch.float64) for v in mean_size)
    centre = torch.stack([w * (1 - rel_w) / 2, h * (1 - rel_h) / 2, w * (1 + rel_w) / 2, h * (1 + rel_h) / 2], dim=1)
    return {"whole_image": (box_iou(whole, gt) >= threshold).double().mean().item(),
            "centre_mean_size": (box_iou(centre, gt) >= threshold).double().mean().item()}
