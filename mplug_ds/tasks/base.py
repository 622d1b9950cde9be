"""The fine-tuning task interface: what the engine asks of a task, nothing more.

A task builds the module DeepSpeed trains from an ``MPLUG`` (its forward returns a dict of losses with
``loss`` first), names the sample field it prepares (``sample_task``), says which shard fields it needs, and
evaluates exactly once per sample on any world size, returning metrics (rank 0), the baseline the primary metric
must beat, and a JSON-serialisable results file.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from mplug_ds.config import from_dict
from mplug_ds.data.data_config import DataConfig
from mplug_ds.data.sample import Sample
from mplug_ds.eval.distributed import lockstep_batches
from mplug_ds.eval.pictures import Panel
from mplug_ds.models.mplug import MPLUG

EvalSamples = list[tuple[int, Sample]]


@dataclass
class EvalResult:
    """Outcome of one evaluation; ``metrics``/``baseline``/``results`` are filled on rank 0 only."""

    metrics: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)  # trivial / chance levels of the primary metric
    results: Any = None  # the results file content (JSON-serialisable)
    predictions: list[dict[str, Any]] = field(default_factory=list)  # per sample, with its "index" (the picture)
    picture: Path | None = None  # the PNG of the first samples and their predictions, once written


class FinetuneTask(ABC):
    """One fine-tuning task (grounding, retrieval …) behind the engine."""

    name: ClassVar[str]
    sample_task: ClassVar[str]  # DataConfig.task that prepares its training batches
    loss_keys: ClassVar[tuple[str, ...]]
    metric: ClassVar[str]  # primary metric (higher is better): progress line, best checkpoint, baseline
    config_type: ClassVar[type]
    required_fields: ClassVar[tuple[str, ...]]  # Sample fields every shard sample must have
    results_name: ClassVar[str | None] = None  # also write the results alone as <eval file>.<name>.json
    # module tensors outside the wrapped MPLUG that only fine-tuning trains (a classifier head): ``--evaluate``
    # loads them from the task's fine-tuning checkpoint
    head_prefixes: ClassVar[tuple[str, ...]] = ()
    # the MPLUG parts the task's module runs (state-dict prefixes): a checkpoint that left one of them at random
    # initialisation (a converted release without it) is warned about for fine-tuning, refused for evaluation
    uses: ClassVar[tuple[str, ...]]

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.cfg = from_dict(self.config_type, dict(options or {}), "task")

    @abstractmethod
    def build(self, model: MPLUG) -> nn.Module:
        """The module DeepSpeed trains (wrapping ``model``); ``forward(batch, **step_args)`` → losses."""

    def check_run(self, micro_batch: int, global_batch: int) -> None:
        """Raise ``ConfigError`` if the batch geometry cannot work for this task (default: anything goes)."""

    def missing_fields(self, sample: Sample) -> list[str]:
        """Required fields that ``sample`` lacks (empty or unset); the image unless the task reads ``images``."""
        missing = [f for f in self.required_fields if not getattr(sample, f)]
        return missing if sample.image is not None or "images" in self.required_fields else ["image", *missing]

    @abstractmethod
    def evaluate(self, module: nn.Module, samples: EvalSamples, data: DataConfig, batch_size: int,
                 device: torch.device) -> EvalResult:
        """Evaluate this rank's ``samples`` (a collective: every rank calls it)."""

    def panel(self, sample: Sample, prediction: dict[str, Any]) -> Panel | None:
        """How ``sample`` and its entry of ``EvalResult.predictions`` look in the evaluation's picture (``None``:
        the task draws none)."""
        return None

    def format_metric(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> str:
        """One line: the primary metric beside its baseline (the best trivial predictor, or chance)."""
        value = metrics.get(self.metric, float("nan"))
        best = baseline.get(self.metric, max(baseline.values(), default=float("nan")))
        ratio = f", {value / best:.1f}× the baseline" if best > 0 else ""
        return f"{self.metric}: {value:.4f} (baseline {best:.4f}{ratio})"


IMAGE_TOWER = ("visual.", "visn_fc.", "visn_norm.")  # the ViT and, when its width differs, its projection
FUSED = (*IMAGE_TOWER, "text_encoder.", "fusion.")  # what reads an image and a text together


class SampleTask(FinetuneTask):
    """A task that predicts each sample on its own (every task but retrieval).

    Its evaluation and ``mplug_ds.load``'s predictor run the same two steps: ``eval_items`` (the evaluation's
    preparation of each sample) and ``predict`` (one batch of items → one prediction each), so a prediction is the
    one the evaluation would make.
    """

    @abstractmethod
    def eval_items(self, samples: EvalSamples, data: DataConfig) -> list[dict[str, Any]]:
        """Each sample prepared as evaluation prepares it, with its ``index`` and (when the sample has them) the
        ground-truth fields its evaluation scores."""

    @abstractmethod
    def predict(self, module: nn.Module, items: list[dict[str, Any]], data: DataConfig,
                device: torch.device) -> list[dict[str, Any]]:
        """What the module predicts for each item of one batch (a plain dict of JSON values per item)."""


def predict_in_lockstep(task: SampleTask, module: nn.Module, items: list[dict[str, Any]], data: DataConfig,
                        batch_size: int, device: torch.device, keep: tuple[str, ...]) -> list[dict[str, Any]]:
    """``task.predict`` over this rank's items in lockstep batches (filler batches dropped): per item its ``keep``
    fields and its prediction."""
    predictions = []
    for chunk, real in lockstep_batches(items, batch_size, items[0] if items else None, device):
        predicted = task.predict(module, chunk, data, device)
        if real:
            predictions += [{k: item[k] for k in keep} | p for item, p in zip(chunk, predicted)]
    return predictions
