"""Referring-expression grounding (RefCOCO / RefCOCO+ / RefCOCOg) with coordinate tokens (mPLUG §7.4).

A box is four quantised tokens (cx, cy, w, h), each one of 337 bins mapped to ``[unused340] … [unused676]``;
the decoder reads the fused ``[image; expression]`` memory and predicts the tokens after a ``[unused339]``
prefix. The training loss is the teacher-forced cross-entropy of the four tokens, each weighted by the L1
error of its greedy prediction and the sample by 1 − GIoU, computed **per sample** (the reference broadcast
the weights across the batch, §12.7). Inference decodes four tokens greedily, restricted to the bins, with the
shared beam search (``mplug_ds.models.generation``, one beam).
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mplug_ds.data.collate import Preparer, collate_grounding
from mplug_ds.data.data_config import DataConfig
from mplug_ds.data.sample import Sample
from mplug_ds.data.tokenizer import unused_token_id
from mplug_ds.data.transforms import box_from_letterbox
from mplug_ds.eval.boxes import box_iou, cxcywh_to_xyxy, generalized_box_iou
from mplug_ds.eval.distributed import gather_to_rank0, merge_predictions
from mplug_ds.eval.grounding import IOU_THRESHOLD, grounding_accuracy, trivial_box_baselines
from mplug_ds.eval.pictures import GROUND_TRUTH, PREDICTED, Panel
from mplug_ds.models.generation import BeamConfig, beam_search
from mplug_ds.models.mplug import MPLUG
from mplug_ds.tasks.base import FUSED, EvalResult, EvalSamples, SampleTask, predict_in_lockstep

NUM_BINS = 337  # bins 0..336; value = bin / 336 (the reference fixes 336 whatever the image resolution)
BIN_SCALE = NUM_BINS - 1
PREFIX_ID = unused_token_id(339)  # 344
FIRST_BIN_ID = unused_token_id(340)  # 345; bins occupy ids 345 … 681
L1_WEIGHT_MAX = 5.0
BOX_DECODING = BeamConfig(num_beams=1, min_length=4, max_length=4)  # greedy, exactly four tokens

Batch = dict[str, torch.Tensor]


@dataclass
class GroundingConfig:
    """Options of the grounding objective."""

    loss_weighting: bool = True  # weight token CE by L1 and 1 − GIoU of the greedy box (the published recipe)


def quantize(values: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] (clamped) → bin indices 0 … 336 (⌊v·336⌋; a de-quantised value maps to its own bin
    despite float rounding)."""
    return (values.float().clamp(0, 1) * BIN_SCALE + 1e-4).floor().long().clamp(max=BIN_SCALE)


def dequantize(bins: torch.Tensor) -> torch.Tensor:
    """Bin indices → values in [0, 1]."""
    return bins.float() / BIN_SCALE


def box_tokens(box_cxcywh: torch.Tensor) -> torch.Tensor:
    """Normalised (cx, cy, w, h) boxes ``(B, 4)`` → decoder inputs ``(B, 5)`` = [prefix, 4 coordinate tokens]."""
    prefix = torch.full((box_cxcywh.shape[0], 1), PREFIX_ID, dtype=torch.long, device=box_cxcywh.device)
    return torch.cat([prefix, quantize(box_cxcywh) + FIRST_BIN_ID], dim=1)


class GroundingModel(nn.Module):
    """The module DeepSpeed trains for grounding: mPLUG whose decoder emits coordinate tokens."""

    def __init__(self, model: MPLUG, cfg: GroundingConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def memory(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder memory ``[image_out; text_out]`` of a batch and its mask."""
        m = self.model
        mask = batch["text_mask"]
        image_out, text_out = m.fuse(m.encode_image(batch["image"]), m.encode_text(batch["text_ids"], mask), mask)
        return m.memory(image_out, text_out, mask)

    def bin_logits(self, ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """Decoder logits restricted to the 337 coordinate ids (the reference's −1e4 logit mask, exactly)."""
        logits = self.model.decoder(ids, torch.ones_like(ids), memory, memory_mask)
        return logits[..., FIRST_BIN_ID:FIRST_BIN_ID + NUM_BINS].float()

    def sample_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample weighted loss ``(B,)`` and unweighted mean token CE ``(B,)``; sample i depends only on i."""
        memory, memory_mask = self.memory(batch)
        target = batch["box"].float()
        ids = box_tokens(target)
        logits = self.bin_logits(ids[:, :-1], memory, memory_mask)  # (B, 4, bins): position k predicts token k+1
        ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:] - FIRST_BIN_ID, reduction="none")  # (B, 4)
        if not self.cfg.loss_weighting:
            return ce.mean(dim=1), ce.mean(dim=1)
        with torch.no_grad():
            pred = dequantize(logits.argmax(dim=-1))  # (B, 4) teacher-forced greedy box
            w_l1 = (pred - target).abs().clamp(0, L1_WEIGHT_MAX)  # (B, 4)
            w_giou = 1 - generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target))  # (B,)
        return (ce * w_l1 * w_giou[:, None]).mean(dim=1), ce.mean(dim=1)

    def forward(self, batch: Batch, **_: Any) -> dict[str, torch.Tensor]:
        """``loss`` (weighted, mean over samples) and ``loss_ce`` (unweighted token CE, for monitoring)."""
        weighted, ce = self.sample_losses(batch)
        return {"loss": weighted.mean(), "loss_ce": ce.mean().detach()}

    @torch.no_grad()
    def predict_boxes(self, batch: Batch) -> torch.Tensor:
        """Greedy 4-token decoding over the bins (beam search with one beam, KV-cached) → normalised
        (cx, cy, w, h) boxes ``(B, 4)`` of the padded image."""
        memory, memory_mask = self.memory(batch)
        prefix = torch.full((memory.shape[0], 1), PREFIX_ID, dtype=torch.long, device=memory.device)
        out = beam_search(self.model.decoder, memory, memory_mask, prefix, BOX_DECODING, eos_id=None,
                          token_range=(FIRST_BIN_ID, FIRST_BIN_ID + NUM_BINS), sync_ranks=False)  # always 4 steps
        return dequantize(torch.tensor(out.tokens, device=memory.device) - FIRST_BIN_ID)


def boxes_to_original(pred_cxcywh: torch.Tensor, image_size: torch.Tensor, res: int) -> list[list[float]]:
    """Normalised boxes of the padded res×res test image → xyxy boxes in original image pixels."""
    padded = (cxcywh_to_xyxy(pred_cxcywh.float().cpu()) * res).tolist()
    return [box_from_letterbox(box, int(w), int(h), res) for box, (w, h) in zip(padded, image_size.tolist())]


class GroundingTask(SampleTask):
    """RefCOCO-style grounding: Acc@IoU≥0.5 overall and per split, boxes reported in original pixels."""

    name = "grounding"
    sample_task = "grounding"
    loss_keys = ("loss", "loss_ce")
    metric = "acc"
    config_type = GroundingConfig
    required_fields = ("texts", "boxes")
    uses = (*FUSED, "decoder.")

    def build(self, model: MPLUG) -> GroundingModel:
        return GroundingModel(model, self.cfg)

    def format_metric(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> str:
        acc = metrics.get("acc", float("nan"))
        name, best = max(baseline.items(), key=lambda kv: kv[1], default=("none", float("nan")))
        ratio = f" = {acc / best:.1f}×" if best > 0 else ""
        return f"acc (Acc@IoU≥0.5): {acc:.4f} vs best trivial box ({name}) {best:.4f}{ratio}"

    def eval_items(self, samples: EvalSamples, data: DataConfig) -> list[dict[str, Any]]:
        prepare = Preparer(dataclasses.replace(data, task="grounding", train=False))
        return [prepare(sample, random.Random(0)) | {"index": index} for index, sample in samples]

    @torch.no_grad()
    def predict(self, module: nn.Module, items: list[dict[str, Any]], data: DataConfig,
                device: torch.device) -> list[dict[str, Any]]:
        """``pred_box``: the greedily decoded box, xyxy in the pixels of the original image."""
        batch = collate_grounding(items, data.max_len)
        tensors = {k: batch[k].to(device) for k in ("image", "text_ids", "text_mask")}
        boxes = boxes_to_original(module.predict_boxes(tensors), batch["image_size"], data.image_res)
        return [{"pred_box": box} for box in boxes]

    @torch.no_grad()
    def evaluate(self, module: nn.Module, samples: EvalSamples, data: DataConfig, batch_size: int,
                 device: torch.device) -> EvalResult:
        predictions = predict_in_lockstep(self, module, self.eval_items(samples, data), data, batch_size, device,
                                          keep=("index", "key", "split", "text", "gt_box", "image_size"))
        gathered = gather_to_rank0(predictions)
        if gathered is None:
            return EvalResult()
        merged = merge_predictions(gathered)
        return EvalResult(metrics=grounding_accuracy(merged), baseline=trivial_box_baselines(merged),
                          results=merged, predictions=merged)

    def panel(self, sample: Sample, prediction: dict[str, Any]) -> Panel:
        predicted = (prediction["pred_box"], PREDICTED, "predicted")
        if prediction.get("gt_box") is None:  # an expression of one's own: no true box
            box = ", ".join(f"{v:.0f}" for v in prediction["pred_box"])
            return Panel(images=[sample.image], lines=[prediction["text"], f"box [{box}]"], boxes=[predicted])
        iou = float(box_iou(torch.tensor([prediction["pred_box"]]), torch.tensor([prediction["gt_box"]]))[0])
        boxes = [(prediction["gt_box"], GROUND_TRUTH, "truth"), predicted]
        return Panel(images=[sample.image], lines=[prediction["text"], f"IoU {iou:.2f}"], correct=iou >= IOU_THRESHOLD,
                     boxes=boxes)
