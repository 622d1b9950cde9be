"""NLVR2: is a statement true of a pair of images? (two classes; our head, ``docs/tasks.md``).

The statement is fused with each image separately through the shared fusion encoder (the two fusions run as
one batch of 2B); the fused text [CLS] states of the left and the right pair are concatenated in that order
and an MLP gives False/True. Concatenation keeps the order, which statements about "the left image" need; the
training preparation swaps the pair together with the words left/right, so both sides see both roles.
"""
from __future__ import annotations

import torch

from mplug_ds.data.collate import collate_nlvr2
from mplug_ds.data.formats.nlvr2 import LABELS
from mplug_ds.models.mplug import MPLUG
from mplug_ds.tasks.classification import Batch, ClassificationModel, ClassificationTask, ClassifierHead


class NLVR2Model(ClassificationModel):
    """mPLUG + MLP on [fused [CLS] with the left image; fused [CLS] with the right image]."""

    def __init__(self, model: MPLUG) -> None:
        super().__init__(model)
        hidden = model.cfg.text.hidden_size
        self.head = ClassifierHead(2 * hidden, hidden, len(LABELS))

    def pair_states(self, batch: Batch) -> torch.Tensor:
        """``(B, 2, H)``: the statement's fused [CLS] state with the left (0) and with the right (1) image."""
        m = self.model
        b = batch["image0"].shape[0]
        images = m.encode_image(torch.cat([batch["image0"], batch["image1"]]))
        mask = batch["text_mask"]
        text = m.encode_text(batch["text_ids"], mask)
        _, fused = m.fuse(images, text.repeat(2, 1, 1), mask.repeat(2, 1))
        return torch.stack([fused[:b, 0], fused[b:, 0]], dim=1)

    def logits(self, batch: Batch) -> torch.Tensor:
        return self.head(self.pair_states(batch).flatten(1)).float()


class NLVR2Task(ClassificationTask):
    """NLVR2: accuracy on dev / test1 (per split) beside the majority class."""

    name = "nlvr2"
    sample_task = "nlvr2"
    required_fields = ("images", "texts", "label")
    label_names = tuple(sorted(LABELS, key=LABELS.get))  # ("False", "True")
    input_keys = ("image0", "image1", "text_ids", "text_mask")
    collate = staticmethod(collate_nlvr2)

    def missing_fields(self, sample) -> list[str]:
        missing = super().missing_fields(sample)
        if sample.images and len(sample.images) != 2:
            missing.insert(0, "images (a left and a right image)")
        return missing

    def build(self, model: MPLUG) -> NLVR2Model:
        return NLVR2Model(model)
