"""End-of-run zero-shot image–text retrieval with the contrastive heads (R@1/R@5, both directions), and its picture."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF

from mplug_ds.data.batch import RetrievalSet
from mplug_ds.data.tokenizer import get_tokenizer
from mplug_ds.data.transforms import CLIP_MEAN, CLIP_STD
from mplug_ds.eval.pictures import Panel, draw_panels
from mplug_ds.eval.retrieval import chance_recalls
from mplug_ds.models.mplug import MPLUG
from mplug_ds.runtime import watchdog

SHOWN_IMAGES, SHOWN_TEXTS = 8, 3
log = logging.getLogger(__name__)


def retrieval_picture_path(output_dir: Path, step: int) -> Path:
    """Where the retrieval evaluation after ``step`` draws its picture."""
    return Path(output_dir) / "eval" / f"retrieval_step_{step:08d}.png"


def recall_at_k(sim: torch.Tensor, text_to_image: torch.Tensor, k: int) -> tuple[float, float]:
    """``(image→text R@k, text→image R@k)`` for an (images × texts) similarity matrix."""
    top_images = sim.t().topk(min(k, sim.shape[0]), dim=1).indices  # per text
    t2i = (top_images == text_to_image[:, None]).any(dim=1).float().mean().item()
    top_texts = sim.topk(min(k, sim.shape[1]), dim=1).indices  # per image
    i2t = (text_to_image[top_texts] == torch.arange(sim.shape[0])[:, None]).any(dim=1).float().mean().item()
    return i2t, t2i


@torch.no_grad()
def zero_shot_retrieval(engine: Any, model: MPLUG, data: RetrievalSet, batch_size: int,
                        picture: Path | None = None) -> dict[str, float]:
    """Retrieval by cosine similarity of the ITA features; with ``picture``, also draw it there (``draw_retrieval``).

    Every rank encodes the whole (small) held-out set, so under ZeRO-3 all ranks run the same forwards and
    gather the same parameters; the result is identical on every rank.
    """
    engine.eval()
    device = engine.device
    image_feats, text_feats = [], []
    try:
        for i in range(0, len(data.images), batch_size):
            watchdog.beat(evaluation_images=f"{i}/{len(data.images)}")
            image_feats.append(model.image_feature(model.encode_image(data.images[i:i + batch_size].to(device))))
        for i in range(0, len(data.text_ids), batch_size):
            watchdog.beat(evaluation_texts=f"{i}/{len(data.text_ids)}")
            text_feats.append(model.text_feature(model.encode_text(data.text_ids[i:i + batch_size].to(device),
                                                                   data.text_mask[i:i + batch_size].to(device))))
    finally:
        engine.train()
    sim = (torch.cat(image_feats) @ torch.cat(text_feats).t()).float().cpu()
    i2t1, t2i1 = recall_at_k(sim, data.text_to_image, 1)
    i2t5, t2i5 = recall_at_k(sim, data.text_to_image, 5)
    chance_pct = chance_recalls(data.text_to_image.tolist(), sim.shape[0])
    chance = {f"{d}_r{k}_chance": chance_pct[f"{name}_r{k}"] / 100 for k in (1, 5)
              for d, name in (("i2t", "tr"), ("t2i", "ir"))}
    if picture is not None:
        try:  # a picture that cannot be drawn must not end the run
            draw_retrieval(data, sim, picture)
        except Exception as err:  # reported: the evaluation itself succeeded
            log.warning("the retrieval picture was not written (%s: %s)", type(err).__name__, err)
    return {"i2t_r1": i2t1, "t2i_r1": t2i1, "i2t_r5": i2t5, "t2i_r5": t2i5, **chance,
            "num_images": float(sim.shape[0]), "num_texts": float(sim.shape[1])}


def draw_retrieval(data: RetrievalSet, sim: torch.Tensor, out: Path) -> Path:
    """Evenly spaced held-out images, each with its most similar captions (✓: one of its own) and their cosine."""
    tokenizer = get_tokenizer()
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    panels = []
    for i in range(0, sim.shape[0], max(1, sim.shape[0] // SHOWN_IMAGES))[:SHOWN_IMAGES]:
        top = sim[i].topk(min(SHOWN_TEXTS, sim.shape[1])).indices.tolist()
        right = [int(data.text_to_image[t]) == i for t in top]
        texts = tokenizer.batch_decode(data.text_ids[top].tolist(), skip_special_tokens=True)
        lines = [f"{'✓' if ok else '✗'} {text} ({float(sim[i, t]):.2f})" for t, text, ok in zip(top, texts, right)]
        image = TF.to_pil_image((data.images[i].float() * std + mean).clamp(0, 1))
        panels.append(Panel(images=[image], lines=["closest captions:", *lines], correct=right[0]))
    return draw_panels(panels, out, f"zero-shot retrieval: {len(panels)} held-out images, evenly spaced ({out.stem})")
