"""Image captioning (COCO Karpathy split), mPLUG §7.2.

The decoder cross-attends directly to the image tokens (the text encoder and fusion are not used) and is trained
with the mean token cross-entropy of ``[CLS] caption [SEP]`` (one of the image's captions, drawn each time).
Evaluation: beam search from ``[CLS]`` (published: 5 beams, 8–25 tokens); BLEU-1..4, METEOR, ROUGE-L, CIDEr (and
SPICE when it can run) with pycocoevalcap against all reference captions; results in the COCO format
``[{"image_id", "caption"}]``. Baseline: the CIDEr of the most frequent training caption given to every image.
"""
from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from mplug_ds.config import ConfigError
from mplug_ds.data.collate import Preparer
from mplug_ds.data.data_config import DataConfig
from mplug_ds.data.sample import Sample
from mplug_ds.data.tokenizer import CLS_ID, SEP_ID
from mplug_ds.data.transforms import pre_caption
from mplug_ds.eval.caption import caption_metrics, constant_caption_cider
from mplug_ds.eval.distributed import gather_to_rank0, merge_predictions
from mplug_ds.eval.pictures import Panel
from mplug_ds.models.generation import BeamConfig, beam_search
from mplug_ds.models.mplug import MPLUG
from mplug_ds.tasks.base import IMAGE_TOWER, EvalResult, EvalSamples, SampleTask, predict_in_lockstep
from mplug_ds.tasks.train_stats import on_rank0, training_annotations
from mplug_ds.tasks.vqa import decode_text

Batch = dict[str, torch.Tensor]


@dataclass
class CaptionConfig:
    """Options of caption decoding and evaluation."""

    num_beams: int = 5
    min_length: int = 8  # tokens before [SEP]
    max_length: int = 25  # tokens including [SEP]
    length_penalty: float = 0.6
    no_repeat_ngram: int = 0  # n > 0: block repeated n-grams (not in the published setting)
    spice: bool = True  # compute SPICE when its CoreNLP models are installed (reported unavailable otherwise)
    train_scan_samples: int = 100_000  # training images read to find the most frequent caption (the baseline)


class CaptionModel(nn.Module):
    """The module DeepSpeed trains for captioning: the decoder over the image tokens."""

    def __init__(self, model: MPLUG) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, **_: Any) -> dict[str, torch.Tensor]:
        """``loss``: mean token cross-entropy of the caption given the image tokens."""
        image = self.model.encode_image(batch["image"])
        return {"loss": self.model.decoder.lm_loss(batch["text_ids"], batch["text_mask"], image, None)}

    @torch.no_grad()
    def generate(self, images: torch.Tensor, cfg: BeamConfig) -> list[str]:
        """Beam-searched captions, one per image."""
        image = self.model.encode_image(images)
        prompt = torch.full((image.shape[0], 1), CLS_ID, dtype=torch.long, device=image.device)
        out = beam_search(self.model.decoder, image, None, prompt, cfg, eos_id=SEP_ID)
        return [decode_text(t) for t in out.tokens]


def coco_image_id(image_id: str | None, key: str) -> int | str:
    """The COCO result file's ``image_id``: the integer id when numeric, else the id (or sample key) as given."""
    value = image_id if image_id is not None else key
    return int(value) if str(value).isdigit() else value


class CaptionTask(SampleTask):
    """COCO captioning: CIDEr selects; BLEU-1..4, METEOR, ROUGE-L (and SPICE) reported."""

    name = "caption"
    sample_task = "caption"
    loss_keys = ("loss",)
    metric = "cider"
    config_type = CaptionConfig
    required_fields = ("texts",)
    results_name = "captions"
    uses = (*IMAGE_TOWER, "decoder.")

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        cfg = self.cfg
        if cfg.num_beams < 1 or not 0 <= cfg.min_length < cfg.max_length:
            raise ConfigError("task.options: need num_beams >= 1 and 0 <= min_length < max_length")
        self._frequent: str | None = None
        self._spice_note: str | None = None

    def build(self, model: MPLUG) -> CaptionModel:
        return CaptionModel(model)

    def format_metric(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> str:
        cider, base = metrics.get("cider", float("nan")), baseline.get("cider", float("nan"))
        ratio = f" = {cider / base:.1f}×" if base > 0 else ""
        spice = f"; SPICE unavailable: {self._spice_note}" if self._spice_note else ""
        return f"CIDEr {cider:.4f} vs constant caption '{self._frequent}' {base:.4f}{ratio}{spice}"

    def most_frequent_caption(self, data: DataConfig) -> str | None:
        if self._frequent is None:
            self._frequent = on_rank0(lambda: frequent_caption(data, self.cfg.train_scan_samples))
        return self._frequent

    def eval_items(self, samples: EvalSamples, data: DataConfig) -> list[dict[str, Any]]:
        prepare = Preparer(dataclasses.replace(data, task="caption", train=False))
        return [{"index": index, "image": prepare.image(sample, random.Random(0)), "references": list(sample.texts),
                 "image_id": coco_image_id(sample.image_id, sample.key)} for index, sample in samples]

    @torch.no_grad()
    def predict(self, module: nn.Module, items: list[dict[str, Any]], data: DataConfig,
                device: torch.device) -> list[dict[str, Any]]:
        """``caption``: beam search from [CLS] over the image tokens."""
        cfg = self.cfg
        beam = BeamConfig(cfg.num_beams, cfg.min_length, cfg.max_length, cfg.length_penalty,
                          no_repeat_ngram=cfg.no_repeat_ngram)
        captions = module.generate(torch.stack([it["image"] for it in items]).to(device), beam)
        return [{"caption": caption} for caption in captions]

    @torch.no_grad()
    def evaluate(self, module: nn.Module, samples: EvalSamples, data: DataConfig, batch_size: int,
                 device: torch.device) -> EvalResult:
        constant = self.most_frequent_caption(data)
        predictions = predict_in_lockstep(self, module, self.eval_items(samples, data), data, batch_size, device,
                                          keep=("index", "image_id", "references"))
        gathered = gather_to_rank0(predictions)
        if gathered is None:
            return EvalResult()
        merged = merge_predictions(gathered)
        by_id = {p["index"]: p for p in merged}  # sample indices: unique even when image ids repeat
        references = {i: p["references"] for i, p in by_id.items()}
        metrics, self._spice_note = caption_metrics(references, {i: p["caption"] for i, p in by_id.items()},
                                                    spice=self.cfg.spice)
        metrics["num_images"] = float(len(merged))
        if constant is None:  # no training annotations readable: the evaluation references' most frequent caption
            constant = Counter(pre_caption(r, 50) for p in merged for r in p["references"]).most_common(1)[0][0]
        self._frequent = constant
        baseline = {"cider": constant_caption_cider(references, constant)}
        results = [{"image_id": p["image_id"], "caption": p["caption"]} for p in merged]
        return EvalResult(metrics=metrics, baseline=baseline, results=results, predictions=merged)

    def panel(self, sample: Sample, prediction: dict[str, Any]) -> Panel:
        lines = [f"generated: {prediction['caption']}"]
        references = prediction.get("references") or []  # none for an image of one's own
        return Panel(images=[sample.image], lines=lines + [f"reference: {r}" for r in references[:1]])


def frequent_caption(data: DataConfig, limit: int) -> str | None:
    """The most frequent (normalised) caption among the training samples' captions."""
    counts = Counter(pre_caption(t, data.max_words) for s in training_annotations(data.sources, limit)
                     for t in s.texts)
    counts.pop("", None)
    return counts.most_common(1)[0][0] if counts else None
