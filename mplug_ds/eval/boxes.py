"""Box geometry shared by the grounding head and its metric: formats, IoU, GIoU.

Boxes are float tensors ``(..., 4)``. ``xyxy`` = (x0, y0, x1, y1) with x1/y1 exclusive (the project's sample
convention); ``cxcywh`` = (centre x, centre y, width, height). No "+1 pixel" convention anywhere.
"""
from __future__ import annotations

import torch


def cxcywh_to_xyxy(box: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) → (x0, y0, x1, y1)."""
    cx, cy, w, h = box.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(box: torch.Tensor) -> torch.Tensor:
    """(x0, y0, x1, y1) → (cx, cy, w, h)."""
    x0, y0, x1, y1 = box.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def _area(box: torch.Tensor) -> torch.Tensor:
    return (box[..., 2] - box[..., 0]).clamp(min=0) * (box[..., 3] - box[..., 1]).clamp(min=0)


def _intersection_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.maximum(a[..., :2], b[..., :2])
    hi = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(dim=-1)
    return inter, _area(a) + _area(b) - inter


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of xyxy boxes (broadcasting); 0 where the union is empty."""
    inter, union = _intersection_union(a, b)
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise GIoU of xyxy boxes: IoU − (enclosing area − union) / enclosing area, in [−1, 1]."""
    inter, union = _intersection_union(a, b)
    iou = torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))
    lo = torch.minimum(a[..., :2], b[..., :2])
    hi = torch.maximum(a[..., 2:], b[..., 2:])
    enclosing = (hi - lo).clamp(min=0).prod(dim=-1)
    return iou - torch.where(enclosing > 0, (enclosing - union) / enclosing.clamp(min=1e-12),
                             torch.zeros_like(enclosing))
