"""What the classification tasks (NLVR2, SNLI-VE) share: an MLP head on fused [CLS] states, cross-entropy
training, and exact evaluation by accuracy (overall and per split) beside the majority-class baseline and a
text-only one (each text answered with its most frequent training label).

mPLUG released no heads for these tasks (architecture doc §7.5); ours are described in ``docs/tasks.md``.
"""
from __future__ import annotations

import dataclasses
import random
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mplug_ds.data.collate import Preparer
from mplug_ds.data.data_config import DataConfig, SourceConfig
from mplug_ds.data.sample import Sample
from mplug_ds.data.transforms import pre_caption
from mplug_ds.eval.classification import classification_accuracy, majority_baseline, text_only_baseline
from mplug_ds.eval.distributed import gather_to_rank0, merge_predictions
from mplug_ds.eval.pictures import Panel
from mplug_ds.models.mplug import MPLUG
from mplug_ds.tasks.base import FUSED, EvalResult, EvalSamples, SampleTask, predict_in_lockstep
from mplug_ds.tasks.train_stats import on_rank0, training_annotations

Batch = dict[str, torch.Tensor]


def training_label_of_text(sources: Sequence[SourceConfig], limit: int, max_words: int
                           ) -> tuple[dict[str, int], int | None]:
    """The most frequent label of each (normalised) training text among up to ``limit`` training samples, and the
    most frequent label overall (``None`` when no training label is readable)."""
    per_text: dict[str, Counter[int]] = defaultdict(Counter)
    overall: Counter[int] = Counter()
    for sample in training_annotations(sources, limit):
        if sample.texts and sample.label is not None:
            per_text[pre_caption(sample.texts[0], max_words)][int(sample.label)] += 1
            overall[int(sample.label)] += 1
    fallback = overall.most_common(1)[0][0] if overall else None
    return {text: counts.most_common(1)[0][0] for text, counts in per_text.items()}, fallback


@dataclass
class ClassificationConfig:
    """Options of a classification task (NLVR2, SNLI-VE; the head's width is the text width)."""

    train_scan_samples: int = 100_000  # training samples read for the text-only baseline (labels only, no images)


class ClassifierHead(nn.Module):
    """Linear → GELU → Linear: ``(B, in_dim)`` features → ``(B, num_classes)`` logits."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_dim, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.dense(x)))


class ClassificationModel(nn.Module, ABC):
    """The module DeepSpeed trains for a classification task: mPLUG plus a head; ``logits`` is the task's own."""

    def __init__(self, model: MPLUG) -> None:
        super().__init__()
        self.model = model

    @abstractmethod
    def logits(self, batch: Batch) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` in fp32."""

    def forward(self, batch: Batch, **_: Any) -> dict[str, torch.Tensor]:
        """``loss``: cross-entropy of the logits against ``batch["label"]``."""
        return {"loss": F.cross_entropy(self.logits(batch), batch["label"])}


class ClassificationTask(SampleTask):
    """A task that predicts one of ``label_names`` per sample; metric: accuracy."""

    loss_keys = ("loss",)
    metric = "acc"
    head_prefixes = ("head.",)
    uses = FUSED
    config_type = ClassificationConfig
    label_names: ClassVar[tuple[str, ...]]  # index = label id of the shards
    input_keys: ClassVar[tuple[str, ...]]  # batch tensors ``logits`` reads
    collate: ClassVar[Callable[[list[dict[str, Any]], int], dict[str, Any]]]

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self._text_prior: tuple[dict[str, int], int | None] | None = None

    def missing_fields(self, sample: Sample) -> list[str]:
        # label 0 is a valid label: only an unset one is missing
        missing = [f for f in self.required_fields if f != "label" and not getattr(sample, f)]
        return missing + (["label"] if "label" in self.required_fields and sample.label is None else [])

    def format_metric(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> str:
        acc, best = metrics.get("acc", float("nan")), baseline.get("acc", float("nan"))
        ratio = f" = {acc / best:.2f}×" if best > 0 else ""
        text_only = f", text only {baseline['text_only']:.4f}" if "text_only" in baseline else ""
        return (f"acc: {acc:.4f} vs majority class {best:.4f}{ratio} (chance {1 / len(self.label_names):.4f}"
                f"{text_only})")

    def eval_items(self, samples: EvalSamples, data: DataConfig) -> list[dict[str, Any]]:
        prepare = Preparer(dataclasses.replace(data, task=self.sample_task, train=False))
        return [prepare(sample, random.Random(0)) | {"index": index, "split": sample.split}
                for index, sample in samples]

    @torch.no_grad()
    def predict(self, module: nn.Module, items: list[dict[str, Any]], data: DataConfig,
                device: torch.device) -> list[dict[str, Any]]:
        """``pred`` (class id), ``answer`` (its name) and ``probs`` (softmax of the head's logits, 6 decimals)."""
        batch = self.collate(items, data.max_len)
        probs = module.logits({k: batch[k].to(device) for k in self.input_keys}).softmax(dim=-1).cpu()
        return [{"pred": int(p.argmax()), "answer": self.label_names[int(p.argmax())],
                 "probs": [round(float(v), 6) for v in p]} for p in probs]

    @torch.no_grad()
    def evaluate(self, module: nn.Module, samples: EvalSamples, data: DataConfig, batch_size: int,
                 device: torch.device) -> EvalResult:
        if self._text_prior is None:  # read once per run: the training labels do not change between evaluations
            self._text_prior = on_rank0(
                lambda: training_label_of_text(data.sources, self.cfg.train_scan_samples, data.max_words))
        label_of_text, fallback = self._text_prior
        predictions = predict_in_lockstep(self, module, self.eval_items(samples, data), data, batch_size, device,
                                          keep=("index", "key", "split", "text", "label"))
        gathered = gather_to_rank0(predictions)
        if gathered is None:
            return EvalResult()
        merged = [p | {"truth": self.label_names[p["label"]]} for p in merge_predictions(gathered)]
        baseline = majority_baseline(merged) | text_only_baseline(merged, label_of_text, fallback)
        return EvalResult(metrics=classification_accuracy(merged), baseline=baseline,
                          results=merged, predictions=merged)

    def panel(self, sample: Sample, prediction: dict[str, Any]) -> Panel:
        images = list(sample.images) or [sample.image]
        probability = max(prediction["probs"])
        if prediction.get("truth") is None:  # a text of one's own: no label
            return Panel(images=images, lines=[prediction["text"],
                                               f"predicted {prediction['answer']} (p {probability:.2f})"])
        return Panel(images=images,
                     lines=[prediction["text"], f"predicted {prediction['answer']} · truth {prediction['truth']}"],
                     correct=prediction["answer"] == prediction["truth"])
