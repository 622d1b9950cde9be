"""SNLI-VE visual entailment: does the image premise entail, contradict or say nothing about the hypothesis?
(three classes; our head, ``docs/tasks.md``): the hypothesis fused with the image, its fused [CLS] state → MLP."""
from __future__ import annotations

import torch

from mplug_ds.data.collate import collate_ve
from mplug_ds.data.formats.snli_ve import LABELS
from mplug_ds.models.mplug import MPLUG
from mplug_ds.tasks.classification import Batch, ClassificationModel, ClassificationTask, ClassifierHead


class VEModel(ClassificationModel):
    """mPLUG + MLP on the hypothesis' fused [CLS] state."""

    def __init__(self, model: MPLUG) -> None:
        super().__init__(model)
        hidden = model.cfg.text.hidden_size
        self.head = ClassifierHead(hidden, hidden, len(LABELS))

    def logits(self, batch: Batch) -> torch.Tensor:
        m = self.model
        mask = batch["text_mask"]
        _, fused = m.fuse(m.encode_image(batch["image"]), m.encode_text(batch["text_ids"], mask), mask)
        return self.head(fused[:, 0]).float()


class VETask(ClassificationTask):
    """SNLI-VE: accuracy on dev / test (per split) beside the majority class."""

    name = "ve"
    sample_task = "ve"
    required_fields = ("texts", "label")
    label_names = tuple(sorted(LABELS, key=LABELS.get))  # ("contradiction", "neutral", "entailment")
    input_keys = ("image", "text_ids", "text_mask")
    collate = staticmethod(collate_ve)

    def build(self, model: MPLUG) -> VEModel:
        return VEModel(model)
