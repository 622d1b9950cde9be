"""End-of-run zero-shot image–text retrieval with the contrastive heads (R@1/R@5, both directions)."""
from __future__ import annotations

import math
from typing import Any

import torch

from mplug_ds.data.batch import RetrievalSet
from mplug_ds.models.mplug import MPLUG


def recall_at_k(sim: torch.Tensor, text_to_image: torch.Tensor, k: int) -> tuple[float, float]:
    """``(image→text R@k, text→image R@k)`` for an (images × texts) similarity matrix."""
    top_images = sim.t().topk(min(k, sim.shape[0]), dim=1).indices  # per text
    t2i = (top_images == text_to_image[:, None]).any(dim=1).float().mean().item()
    top_texts = sim.topk(min(k, sim.shape[1]), dim=1).indices  # per image
    i2t = (text_to_image[top_texts] == torch.arange(sim.shape[0])[:, None]).any(dim=1).float().mean().item()
    return i2t, t2i


def chance_recall(text_to_image: torch.Tensor, num_images: int, k: int) -> tuple[float, float]:
    """``(image→text, text→image)`` R@k expected from a random ranking: the floor every figure is read against."""
    num_texts = len(text_to_image)
    per_image = torch.bincount(text_to_image, minlength=num_images).tolist()
    k_texts, k_images = min(k, num_texts), min(k, num_images)
    misses = [math.comb(num_texts - n, k_texts) / math.comb(num_texts, k_texts) for n in per_image]
    return 1 - sum(misses) / num_images, k_images / num_images


@torch.no_grad()
def zero_shot_retrieval(engine: Any, model: MPLUG, data: RetrievalSet, batch_size: int) -> dict[str, float]:
    """Retrieval by cosine similarity of the ITA features.

    Every rank encodes the whole (small) held-out set, so under ZeRO-3 all ranks run the same forwards and
    gather the same parameters; the result is identical on every rank.
    """
    engine.eval()
    device = engine.device
    try:
        image_feats = [model.image_feature(model.encode_image(data.images[i:i + batch_size].to(device)))
                       for i in range(0, len(data.images), batch_size)]
        text_feats = [model.text_feature(model.encode_text(data.text_ids[i:i + batch_size].to(device),
                                                           data.text_mask[i:i + batch_size].to(device)))
                      for i in range(0, len(data.text_ids), batch_size)]
    finally:
        engine.train()
    sim = (torch.cat(image_feats) @ torch.cat(text_feats).t()).float().cpu()
    i2t1, t2i1 = recall_at_k(sim, data.text_to_image, 1)
    i2t5, t2i5 = recall_at_k(sim, data.text_to_image, 5)
    chance = {f"{d}_r{k}_chance": v for k in (1, 5)
              for d, v in zip(("i2t", "t2i"), chance_recall(data.text_to_image, sim.shape[0], k))}
    return {"i2t_r1": i2t1, "t2i_r1": t2i1, "i2t_r5": i2t5, "t2i_r5": t2i5, **chance,
            "num_images": float(sim.shape[0]), "num_texts": float(sim.shape[1])}
