"""TiMix pre-training (timix_algorithm.md): patch-text alignment + text-aware mixing on top of the mPLUG losses.

One forward computes, for a caption batch and a region batch,
  * the mPLUG losses (``PretrainModel``), with the ViT hidden states after the predictor's block tapped;
  * the patch-text alignment (PTA) loss: region images run the ViT only up to that block, once per image, and the
    patch predictor classifies every patch against every region phrase of that image;
  * the mixed contrastive loss: each image's least caption-relevant window is overwritten by its partner's most
    relevant window; the mixed images are encoded and contrasted with the main step's text features under soft
    targets built with global indices (right for any world size);
and returns ``loss = main + pta_weight·L_pta + γ·L_mix`` for ONE backward and ONE optimizer step.
``step_order: reference_three_steps`` instead runs the reference's three phases (PTA, main, mixed), one optimizer
step each, for A/B comparisons.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mplug_ds.config import ConfigError
from mplug_ds.data.data_config import StreamConfig
from mplug_ds.distributed import all_gather, all_gather_with_grad, get_rank, get_world_size
from mplug_ds.models.mplug import MPLUG
from mplug_ds.objectives.pretrain import Batch, PretrainConfig, PretrainModel, soft_cross_entropy
from mplug_ds.objectives.timix_mixing import (
    LABEL_MODES,
    LabelMode,
    MixPlan,
    Pairing,
    draw_partners,
    draw_sides,
    mix_pixels,
    mix_tokens,
    mixed_targets,
    plan_mix,
    side_range,
    source_share,
    standardize,
)
from mplug_ds.runtime import collectives

StepOrder = Literal["fused", "reference_three_steps"]
PHASES = ("fused", "pta", "main", "mix")
MAIN_KEYS = ("loss_ita", "loss_itm", "loss_mlm", "loss_prefix")
# What every forward returns besides "loss" and the mPLUG losses (0 when a part did not run this step).
LOG_KEYS = ("loss_pta", "pta_accuracy", "pta_precision", "pta_recall", "pta_positive_rate", "loss_mix",
            "mix_lambda_mean", "mix_lambda_min", "mix_lambda_max", "mix_side_mean")


@dataclass
class TimixConfig:
    """TiMix switches and knobs (the ``timix`` block of a pre-training config)."""

    enabled: bool = False  # TiMix on (patch predictor, alignment loss, mixing) or off (nothing built or run)
    predictor_layer: int | None = None  # ViT block (0-based) the patch predictor reads; null: layers // 2 − 1
    pta_weight: float = 1.0  # weight of the patch-text alignment loss
    region_images_per_gpu: int = 8  # region-shard images per rank and step (each brings up to max_regions phrases)
    # region shards (needed with data.source=shards; the demo brings its own)
    regions: StreamConfig = field(default_factory=StreamConfig)
    mix_weight: float = 1.0  # γ after its ramp
    gamma_ramp_steps: int = 1000  # γ rises linearly from 0 at step 0 to mix_weight at this step
    mix_stop_step: int | None = None  # no mixing from this optimizer step on (null: never stops)
    min_side_ratio: float = 0.35  # window side k ∈ ⌊S·min⌋ … ⌊S·max⌋ patches (S = patches per image side)
    max_side_ratio: float = 0.75  # upper bound of the window side as a share of S
    side_per_sample: bool = False  # one k per batch (reference) or one per sample
    pairing: Pairing = "flip"  # flip i ↔ B−1−i (reference) | derangement (random, never self)
    mix_space: Literal["tokens", "pixels"] = "tokens"  # mix patch embeddings or pixels (equivalent)
    label_mode: LabelMode = "area_pred"  # soft targets: λ from area or relevance, over predictions or one-hot
    step_order: StepOrder = "fused"  # one optimizer step per batch, or the reference's three (A/B only)

    def __post_init__(self) -> None:
        if self.label_mode not in LABEL_MODES:
            raise ConfigError(f"timix.label_mode '{self.label_mode}' is not one of {', '.join(LABEL_MODES)}")
        if not 0 < self.min_side_ratio <= self.max_side_ratio < 1:
            raise ConfigError("timix needs 0 < min_side_ratio <= max_side_ratio < 1, got "
                              f"{self.min_side_ratio} and {self.max_side_ratio}")
        if self.gamma_ramp_steps < 0 or self.region_images_per_gpu < 1:
            raise ConfigError("timix.gamma_ramp_steps must be >= 0 and timix.region_images_per_gpu >= 1")

    def layer_for(self, vit_layers: int) -> int:
        """The predictor's block for a ViT of ``vit_layers`` blocks (5 of 12, 11 of 24 by default)."""
        return self.predictor_layer if self.predictor_layer is not None else max(0, vit_layers // 2 - 1)

    def gamma(self, step: int) -> float:
        """Weight of the mixed loss at optimizer step ``step`` (0 at step 0, 0 from ``mix_stop_step`` on)."""
        if not self.enabled or (self.mix_stop_step is not None and step >= self.mix_stop_step):
            return 0.0
        ramp = 1.0 if self.gamma_ramp_steps == 0 else min(1.0, step / self.gamma_ramp_steps)
        return self.mix_weight * ramp


def alignment_loss(log_probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """2-class NLL over every (phrase, patch) and the global accuracy, precision and recall of "relevant".

    Metrics count over all ranks (one small all-reduce), so they do not depend on the world size.
    """
    loss = F.nll_loss(log_probs.reshape(-1, 2), labels.reshape(-1))
    with torch.no_grad():
        pred, truth = log_probs.argmax(dim=-1).bool(), labels.bool()
        counts = torch.stack([(pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum(),
                              (pred == truth).sum(), torch.tensor(truth.numel(), device=truth.device),
                              truth.sum()]).double()
        if get_world_size() > 1:
            with collectives.part("timix"):
                dist.all_reduce(counts)
        tp, fp, fn, correct, total, positives = counts
        metrics = {"pta_accuracy": correct / total, "pta_precision": tp / (tp + fp).clamp_min(1),
                   "pta_recall": tp / (tp + fn).clamp_min(1), "pta_positive_rate": positives / total}
    return loss, {k: v.float() for k, v in metrics.items()}


class TimixPretrainModel(PretrainModel):
    """``PretrainModel`` plus TiMix; the online ``MPLUG`` must have a patch predictor."""

    def __init__(self, model: MPLUG, cfg: PretrainConfig, timix: TimixConfig) -> None:
        super().__init__(model, cfg)
        if model.patch_predictor is None:
            raise ValueError("TiMix needs a model with a patch predictor (model patch_predictor_layer)")
        self.timix = timix
        self._pending: dict[str, torch.Tensor] | None = None  # reference_three_steps: main phase → mixed phase

    def forward(self, batch: Batch, alpha: float, gamma: float = 0.0, phase: str = "fused"
                ) -> dict[str, torch.Tensor]:
        """Losses of one phase; ``fused`` (default) is everything at once, ``pta``/``main``/``mix`` the three
        reference steps in that order. ``gamma`` weighs the mixed loss (0 skips mixing)."""
        if phase not in PHASES:
            raise ValueError(f"unknown TiMix phase '{phase}' ({', '.join(PHASES)})")
        if phase == "pta":
            return self._complete(self._alignment_only(batch))
        if phase == "mix":
            return self._complete(self._mix_phase(gamma))
        if batch["image"].shape[0] < 2:
            raise ValueError("pre-training needs at least 2 samples per rank (ITM samples in-batch negatives)")
        m = self.model
        image, tapped = m.encode_image_tapped(batch["image"])
        text = m.encode_text(batch["text_ids"], batch["text_mask"])
        out = self.losses(batch, image, text, alpha)
        if phase == "fused" and "region_image" in batch:
            pta, metrics = self.alignment(batch)
            out.update(metrics, loss_pta=pta.detach())
            out["loss"] = out["loss"] + self.timix.pta_weight * pta
        if gamma > 0:
            mix = self.prepare_mix(batch["image"], tapped, image, text)
            if phase == "main":
                self._pending = {**mix, "text_ids": batch["text_ids"], "text_mask": batch["text_mask"]}
            else:
                loss_mix, stats = self.mixed_loss(mix, m.text_feature(text))
                out.update(stats, loss_mix=loss_mix.detach())
                out["loss"] = out["loss"] + gamma * loss_mix
        return self._complete(out)

    @staticmethod
    def _complete(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every phase returns every key (0 for what it did not compute): the engine logs a fixed set, and in the
        three-step order each key is non-zero in exactly one phase, so per-phase values add up per batch."""
        zero = out["loss"].detach().new_zeros(())
        for key in MAIN_KEYS + LOG_KEYS:
            out.setdefault(key, zero)
        return out

    # ------------------------------------------------------------------ patch-text alignment
    def alignment(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """PTA loss and metrics; each region image runs the ViT up to the predictor's block exactly once."""
        m = self.model
        hidden = m.encode_image_prefix(batch["region_image"])
        text = m.encode_text(batch["region_text_ids"], batch["region_text_mask"])
        log_probs = m.patch_log_probs(hidden[batch["region_image_index"]], text)
        return alignment_loss(log_probs, batch["patch_labels"])

    def _alignment_only(self, batch: Batch) -> dict[str, torch.Tensor]:
        loss, metrics = self.alignment(batch)
        return {"loss": self.timix.pta_weight * loss, "loss_pta": loss.detach(), **metrics}

    # ------------------------------------------------------------------ mixing
    def relevance(self, tapped: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Per-patch probability ``(B, N)`` that each patch is relevant to its own caption (no gradient)."""
        with torch.no_grad():
            return self.model.patch_log_probs(tapped.detach(), text.detach())[..., 1].exp()

    def draw_plan(self, probs: torch.Tensor) -> MixPlan:
        """Draw window sides and partners for this rank's batch and plan the mix from relevance ``probs`` (B, N)."""
        t = self.timix
        b, n = probs.shape
        k_min, k_max = side_range(int(n ** 0.5), t.min_side_ratio, t.max_side_ratio)
        return plan_mix(standardize(probs.log()), draw_sides(b, k_min, k_max, t.side_per_sample, probs.device),
                        draw_partners(b, t.pairing, probs.device))

    @torch.no_grad()
    def prepare_mix(self, images: torch.Tensor, tapped: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
                    plan: MixPlan | None = None) -> dict:
        """What the mixed loss needs: images, relevance, the plan (drawn unless given) and, for ``*_pred`` labels,
        the model's predictions on the unmixed global batch."""
        m = self.model
        probs = self.relevance(tapped, text)
        mix = {"images": images, "probs": probs, "plan": plan if plan is not None else self.draw_plan(probs)}
        if self.timix.label_mode.endswith("_pred"):
            image_feat, text_feat = m.image_feature(image), m.text_feature(text)
            with collectives.part("timix"):
                image_all, text_all = all_gather(image_feat), all_gather(text_feat)
            sim = image_all @ text_all.t() / m.temperature()
            mix["base_i2t"], mix["base_t2i"] = F.softmax(sim, dim=1), F.softmax(sim.t(), dim=1)
        return mix

    @torch.no_grad()
    def targets(self, mix: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's source shares λ (B,) and the global soft targets ``(Y_i2t, Y_t2i)`` of the mixed batch."""
        plan: MixPlan = mix["plan"]
        share = source_share(plan, self.timix.label_mode, mix["probs"])
        partners = plan.partners + plan.partners.shape[0] * get_rank()
        with collectives.part("timix"):
            all_share, all_partners = all_gather(share), all_gather(partners)
        y_i2t, y_t2i = mixed_targets(all_share, all_partners, mix.get("base_i2t"), mix.get("base_t2i"))
        return share, y_i2t, y_t2i

    def mixed_images_features(self, images: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        """Contrastive features of the mixed images, mixing patch embeddings or pixels (``timix.mix_space``)."""
        m = self.model
        if self.timix.mix_space == "tokens":
            return m.image_feature(m.encode_image(images, patch_mix=lambda patches: mix_tokens(patches, plan)))
        with torch.no_grad():
            mixed = mix_pixels(images, plan, m.cfg.vision.patch_size)
        return m.image_feature(m.encode_image(mixed))

    def mixed_loss(self, mix: dict, text_feat: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Contrastive loss of the mixed images against the (global) original texts under soft targets."""
        plan: MixPlan = mix["plan"]
        share, y_i2t, y_t2i = self.targets(mix)
        mixed_feat = self.mixed_images_features(mix["images"], plan)
        with collectives.part("timix"):
            mixed, texts = all_gather_with_grad(mixed_feat), all_gather_with_grad(text_feat)
        sim = mixed @ texts.t() / self.model.temperature()
        loss = (soft_cross_entropy(sim, y_i2t) + soft_cross_entropy(sim.t(), y_t2i)) / 2
        stats = {"mix_lambda_mean": share.mean(), "mix_lambda_min": share.min(), "mix_lambda_max": share.max(),
                 "mix_side_mean": plan.sides.float().mean()}
        return loss, {k: v.detach().float() for k, v in stats.items()}

    def _mix_phase(self, gamma: float) -> dict[str, torch.Tensor]:
        """Reference step 3: the mixed loss from the plan of the preceding ``main`` phase, text encoded again."""
        if self._pending is None:
            raise RuntimeError("the 'mix' phase needs a preceding 'main' phase with gamma > 0")
        mix, self._pending = self._pending, None
        m = self.model
        text = m.encode_text(mix["text_ids"], mix["text_mask"])
        loss, stats = self.mixed_loss(mix, m.text_feature(text))
        return {"loss": gamma * loss, "loss_mix": loss.detach(), **stats}
