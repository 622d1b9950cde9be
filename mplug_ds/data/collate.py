"""Per-sample preparation (augment, pick and split text) and batch collation (tokenize, stack) for every task."""
from __future__ import annotations

import hashlib
import random
from typing import Any

import torch
import torch.utils.data
from PIL import Image

from mplug_ds.data.batch import CaptionBatch
from mplug_ds.data.data_config import DataConfig
from mplug_ds.data.sample import Sample
from mplug_ds.data.tokenizer import get_tokenizer
from mplug_ds.data.transforms import (
    box_area,
    box_to_patch_labels,
    grounding_transform,
    image_transform,
    pre_caption,
    pre_question,
    region_transform,
    swap_left_right,
)


def image_index(image_id: str) -> int:
    """A stable non-negative 63-bit integer for an image id (retrieval positives: equal ids, equal integers)."""
    return int.from_bytes(hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def split_prefix(words: list[str], rng: random.Random) -> tuple[str, str]:
    """Prefix-LM split at s ~ U{0..n−1}: (words[:s], words[s:] + " [SEP]") as strings."""
    s = rng.randint(0, len(words) - 1)
    return " ".join(words[:s]), " ".join(words[s:]) + " [SEP]"


def _caption_words(sample: Sample, cfg: DataConfig, rng: random.Random) -> list[str]:
    texts = [t for t in sample.texts if pre_caption(t, cfg.max_words)]
    if not texts:
        raise ValueError("no non-empty caption in texts")
    return pre_caption(rng.choice(texts), cfg.max_words).split()


def _image(sample: Sample) -> Image.Image:
    if not isinstance(sample.image, Image.Image):
        raise ValueError("no image member (.jpg)")
    return sample.image


class Preparer:
    """Turns one decoded ``Sample`` into the un-tokenised item of ``cfg.task`` using an explicit rng."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.transform = image_transform(cfg.image_res, cfg.train, cfg.scale_min, cfg.augment)

    def __call__(self, sample: Sample, rng: random.Random) -> dict[str, Any]:
        return getattr(self, f"_{self.cfg.task}")(sample, rng)

    def image(self, sample: Sample, rng: random.Random) -> torch.Tensor:
        """The sample's image through this preparation's image transform alone (what captioning evaluates)."""
        return self.transform(_image(sample), rng)

    def _caption(self, sample: Sample, rng: random.Random) -> dict[str, Any]:
        words = _caption_words(sample, self.cfg, rng)
        prefix, target = split_prefix(words, rng)
        return {"key": sample.key, "image": self.transform(_image(sample), rng), "text": " ".join(words),
                "prefix": prefix, "target": target}

    def _region(self, sample: Sample, rng: random.Random) -> dict[str, Any]:
        img, cfg = _image(sample), self.cfg
        boxes = [[max(0.0, b[0]), max(0.0, b[1]), min(float(img.width), b[2]), min(float(img.height), b[3])]
                 for b in sample.boxes]
        usable = [i for i, (b, t) in enumerate(zip(boxes, sample.texts))
                  if box_area(b) > 0 and pre_caption(t, cfg.max_words)]
        if not usable:
            raise ValueError("no region with a non-empty box inside the image and a non-empty text")
        tensor, kept, moved, flipped = region_transform(img, [boxes[i] for i in usable], rng.randrange(len(usable)),
                                                        cfg.image_res, rng, cfg.min_region_inside)
        order = rng.sample(range(len(kept)), len(kept))[: cfg.max_regions]
        texts, labels = [], []
        for j in order:
            text = pre_caption(sample.texts[usable[kept[j]]], cfg.max_words)
            texts.append(swap_left_right(text) if flipped and cfg.careful_flip else text)
            labels.append(box_to_patch_labels(moved[j], cfg.image_res, cfg.patch_size))
        return {"key": sample.key, "image": tensor, "texts": texts, "patch_labels": labels}

    def _vqa(self, sample: Sample, rng: random.Random) -> dict[str, Any]:
        if not sample.texts:
            raise ValueError("no question in texts")
        if self.cfg.train and not sample.answers:
            raise ValueError("training VQA sample without answers")
        weights = sample.answer_weights or [1.0 / max(1, len(sample.answers))] * len(sample.answers)
        return {"key": sample.key, "image": self.transform(_image(sample), rng),
                "question": pre_question(sample.texts[0], self.cfg.max_words),
                "answers": list(sample.answers), "weights": list(weights),
                "question_id": sample.extra.get("question_id", sample.key)}

    def _grounding(self, sample: Sample, rng: random.Random) -> dict[str, Any]:
        # Evaluation prepares samples without a box too (an expression to ground): box and gt_box are then None.
        if not sample.texts or (self.cfg.train and not sample.boxes):
            raise ValueError("grounding sample needs texts[0] (expression) and boxes[0]")
        original = _image(sample)
        truth = list(sample.boxes[0]) if sample.boxes else None
        image, box, text = grounding_transform(original, truth, sample.texts[0],
                                               self.cfg.image_res, self.cfg.train, rng, self.cfg.augment)
        return {"key": sample.key, "image": image, "box": box, "text": pre_caption(text, self.cfg.max_words),
                "gt_box": truth, "image_size": [original.width, original.height], "split": sample.split}

    def _retrieval(self, sample: Sample, rng: random.Random) -> dict[str, Any]:
        texts = [c for c in (pre_caption(t, self.cfg.max_words) for t in sample.texts) if c]
        if not texts:
            raise ValueError("no non-empty caption in texts")
        group = sample.image_id or sample.key
        return {"key": sample.key, "image": self.transform(_image(sample), rng), "text": rng.choice(texts),
                "texts": texts, "image_idx": image_index(group)}

    def _nlvr2(self, sample: Sample, rng: random.Random) -> dict[str, Any]:
        # Evaluation prepares unlabelled samples too (a statement to classify): their label is None.
        if len(sample.images) != 2 or not sample.texts or (self.cfg.train and sample.label is None):
            raise ValueError("nlvr2 sample needs .left.jpg/.right.jpg, texts[0] and label")
        left, right = sample.images
        text = sample.texts[0]
        if self.cfg.train and rng.random() < 0.5:  # swapping the pair mirrors the scene: swap the words too
            left, right, text = right, left, swap_left_right(text)
        return {"key": sample.key, "image0": self.transform(left, rng), "image1": self.transform(right, rng),
                "text": pre_caption(text, self.cfg.max_words), "label": _label(sample)}

    def _ve(self, sample: Sample, rng: random.Random) -> dict[str, Any]:
        if not sample.texts or (self.cfg.train and sample.label is None):
            raise ValueError("ve sample needs texts[0] (hypothesis) and label")
        return {"key": sample.key, "image": self.transform(_image(sample), rng),
                "text": pre_caption(sample.texts[0], self.cfg.max_words), "label": _label(sample)}


def _label(sample: Sample) -> int | None:
    return None if sample.label is None else int(sample.label)


def tokenize(texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] … [SEP]`` ids and attention mask, truncated to ``max_len`` and padded with [PAD] to the longest text.

    Padding to the batch's longest text rather than ``max_len`` keeps the text-side work proportional to the
    captions (a typical caption is half of ``max_len`` long).
    """
    enc = get_tokenizer()(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def collate_caption(items: list[dict[str, Any]], max_len: int = 30) -> CaptionBatch:
    """Pre-training batch from prepared items (``key``, ``image``, ``text``, ``prefix``, ``target`` strings)."""
    ids = {name: tokenize([it[name] for it in items], max_len) for name in ("text", "prefix", "target")}
    return CaptionBatch(keys=[it["key"] for it in items], image=torch.stack([it["image"] for it in items]),
                        text_ids=ids["text"][0], text_mask=ids["text"][1], prefix_ids=ids["prefix"][0],
                        prefix_mask=ids["prefix"][1], target_ids=ids["target"][0], target_mask=ids["target"][1])


def collate_region(items: list[dict[str, Any]], max_len: int = 30) -> dict[str, Any]:
    """Patch-text alignment batch: images (B,…), one row per region text: ids/mask (P,L), patch_labels (P,grid²),
    region_image_index (P,) pointing into the images."""
    texts = [t for it in items for t in it["texts"]]
    ids, mask = tokenize(texts, max_len)
    return {"keys": [it["key"] for it in items], "image": torch.stack([it["image"] for it in items]),
            "region_text_ids": ids, "region_text_mask": mask,
            "patch_labels": torch.stack([lab for it in items for lab in it["patch_labels"]]),
            "region_image_index": torch.tensor([i for i, it in enumerate(items) for _ in it["texts"]])}


def collate_vqa(items: list[dict[str, Any]], max_len: int = 30, answer_max_len: int = 10) -> dict[str, Any]:
    """VQA batch: question ids/mask (B,L); answers flattened as ``answer [SEP]`` ids/mask (A,La) with
    answer_weights (A,) and answer_counts (B,) (answers per question); raw answers and question ids kept."""
    batch: dict[str, Any] = {"keys": [it["key"] for it in items], "image": torch.stack([it["image"] for it in items]),
                             "question_id": [it["question_id"] for it in items],
                             "answers": [it["answers"] for it in items]}
    batch["question_ids"], batch["question_mask"] = tokenize([it["question"] for it in items], max_len)
    answers = [a for it in items for a in it["answers"]]
    if answers:
        batch["answer_ids"], batch["answer_mask"] = tokenize([f"{a} [SEP]" for a in answers], answer_max_len)
        batch["answer_weights"] = torch.tensor([w for it in items for w in it["weights"]], dtype=torch.float32)
        batch["answer_counts"] = torch.tensor([len(it["answers"]) for it in items])
    return batch


def collate_grounding(items: list[dict[str, Any]], max_len: int = 30) -> dict[str, Any]:
    """Grounding batch: padded image, text ids/mask, image_size (B,2) (width, height) in original pixels, splits;
    when every item has its box: box (B,4) normalised (cx, cy, w, h) of the padded image and gt_box (B,4) xyxy in
    original pixels."""
    ids, mask = tokenize([it["text"] for it in items], max_len)
    batch = {"keys": [it["key"] for it in items], "image": torch.stack([it["image"] for it in items]),
             "text_ids": ids, "text_mask": mask,
             "image_size": torch.tensor([it["image_size"] for it in items], dtype=torch.long),
             "split": [it["split"] for it in items]}
    if all(it["box"] is not None for it in items):
        batch["box"] = torch.stack([it["box"] for it in items])
        batch["gt_box"] = torch.tensor([it["gt_box"] for it in items], dtype=torch.float32)
    return batch


def collate_retrieval(items: list[dict[str, Any]], max_len: int = 30) -> dict[str, Any]:
    """Retrieval training batch: image, one caption's ids/mask, image_idx (B,) (equal for texts of one image)."""
    ids, mask = tokenize([it["text"] for it in items], max_len)
    return {"keys": [it["key"] for it in items], "image": torch.stack([it["image"] for it in items]),
            "text_ids": ids, "text_mask": mask, "image_idx": torch.tensor([it["image_idx"] for it in items])}


def collate_nlvr2(items: list[dict[str, Any]], max_len: int = 30) -> dict[str, Any]:
    """NLVR2 batch: image0, image1 (B,3,R,R), text ids/mask, label (B,) when every item has one."""
    ids, mask = tokenize([it["text"] for it in items], max_len)
    return _with_labels(items, {"keys": [it["key"] for it in items],
                                "image0": torch.stack([it["image0"] for it in items]),
                                "image1": torch.stack([it["image1"] for it in items]), "text_ids": ids,
                                "text_mask": mask})


def collate_ve(items: list[dict[str, Any]], max_len: int = 30) -> dict[str, Any]:
    """SNLI-VE batch: image, hypothesis ids/mask, label (B,) (0 contradiction, 1 neutral, 2 entailment) when every
    item has one."""
    ids, mask = tokenize([it["text"] for it in items], max_len)
    return _with_labels(items, {"keys": [it["key"] for it in items],
                                "image": torch.stack([it["image"] for it in items]), "text_ids": ids,
                                "text_mask": mask})


def _with_labels(items: list[dict[str, Any]], batch: dict[str, Any]) -> dict[str, Any]:
    if all(it["label"] is not None for it in items):
        batch["label"] = torch.tensor([it["label"] for it in items])
    return batch


def collate(items: list[dict[str, Any]], cfg: DataConfig) -> dict[str, Any]:
    """The collate function of ``cfg.task``."""
    if cfg.task == "vqa":
        return collate_vqa(items, cfg.max_len, cfg.answer_max_len)
    collate_fn = {"caption": collate_caption, "region": collate_region, "grounding": collate_grounding,
                  "retrieval": collate_retrieval, "nlvr2": collate_nlvr2, "ve": collate_ve}[cfg.task]
    return collate_fn(items, cfg.max_len)
