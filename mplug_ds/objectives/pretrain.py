"""mPLUG pre-training objectives: ITA (momentum-distilled, all-gathered), ITM (hard negatives), MLM, prefix LM.

One forward returns every loss and their weighted sum; the caller runs one backward on ``loss``.
Where we differ from the reference code (architecture doc §12) a comment says so.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mplug_ds.data.batch import CaptionBatch as Batch
from mplug_ds.data.tokenizer import CLS_ID, FIRST_WORD_ID, MASK_ID, PAD_ID, SEP_ID
from mplug_ds.distributed import all_gather, all_gather_with_grad, get_rank
from mplug_ds.models.momentum import MomentumTeacher
from mplug_ds.models.mplug import MPLUG
from mplug_ds.runtime import collectives



@dataclass
class PretrainConfig:
    """Loss weights and distillation settings of the pre-training objective."""

    ita_weight: float = 1.0  # weight of the image-text contrastive loss
    itm_weight: float = 1.0  # weight of the image-text matching loss
    mlm_weight: float = 1.0  # weight of the masked language modelling loss
    prefix_weight: float = 1.0  # weight of the prefix language modelling (caption continuation) loss
    distill: bool = True  # momentum teacher for ITA targets and MLM soft labels
    alpha: float = 0.4  # distillation weight at the end of its warm-up (the engine ramps it)
    momentum: float = 0.995  # EMA factor of the momentum teacher per optimizer step
    mlm_probability: float = 0.15  # share of caption word tokens picked for MLM


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``−Σ targets · log_softmax(logits)`` along the last (class / vocabulary) axis."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def mask_tokens(ids: torch.Tensor, probability: float, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick ``probability`` of the word tokens; of those 80% → [MASK], 10% → a random word, 10% kept.

    [PAD], [CLS] and [SEP] are never picked and random replacements are regular words (not special or unused
    ids) — the reference could mask [SEP] and substitute special ids (§12.17). Every row with a word gets at
    least one pick so the loss is always defined. Returns ``(masked_ids, picked)``.
    """
    words = (ids != PAD_ID) & (ids != CLS_ID) & (ids != SEP_ID)
    picked = (torch.rand(ids.shape, device=ids.device) < probability) & words
    empty = ~picked.any(dim=1) & words.any(dim=1)
    if empty.any():
        first_word = words.float().argmax(dim=1)
        picked[empty, first_word[empty]] = True
    roll = torch.rand(ids.shape, device=ids.device)
    masked = ids.masked_fill(picked & (roll < 0.8), MASK_ID)
    random_ids = torch.randint(FIRST_WORD_ID, vocab_size, ids.shape, device=ids.device)
    swap = picked & (roll >= 0.8) & (roll < 0.9)
    return torch.where(swap, random_ids, masked), picked


def sample_negatives(sim: torch.Tensor) -> torch.Tensor:
    """For each row, an index of a hard negative column sampled ∝ softmax(sim row), never the row's own index.

    Non-finite similarities (a diverging step) fall back to uniform weights so the step reaches the engine's
    non-finite guard instead of failing inside ``torch.multinomial``.
    """
    weights = torch.nan_to_num(F.softmax(sim.float(), dim=1), nan=0.0, posinf=0.0) + 1e-5
    weights.fill_diagonal_(0)
    return torch.multinomial(weights, 1).squeeze(1)


class PretrainModel(nn.Module):
    """Wraps the online ``MPLUG`` (the module DeepSpeed trains) and its momentum teacher (kept outside it)."""

    def __init__(self, model: MPLUG, cfg: PretrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        # Not a registered submodule: see MomentumTeacher. The reference never EMA-updates its fusion teacher
        # (§12.6); here every module the teacher runs, fusion and MLM head included, is an EMA pair.
        self.teacher = MomentumTeacher(model, cfg.momentum) if cfg.distill else None

    def forward(self, batch: Batch, alpha: float) -> dict[str, torch.Tensor]:
        """All losses for one batch; ``alpha`` is the current distillation weight (0 disables distillation)."""
        if batch["image"].shape[0] < 2:
            raise ValueError("pre-training needs at least 2 samples per rank (ITM samples in-batch negatives)")
        m = self.model
        image = m.encode_image(batch["image"])
        text = m.encode_text(batch["text_ids"], batch["text_mask"])
        return self.losses(batch, image, text, alpha)

    def losses(self, batch: Batch, image: torch.Tensor, text: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
        """All losses from the batch's encoded images ``image`` and captions ``text`` (what ``forward`` computes)."""
        m, cfg = self.model, self.cfg
        alpha = alpha if self.teacher is not None else 0.0
        ids, mask = batch["text_ids"], batch["text_mask"]
        teacher = self._teacher_forward(batch) if alpha > 0 else None

        loss_ita, sim_i2t, sim_t2i = self.ita_loss(
            m.image_feature(image), m.text_feature(text), teacher and teacher[1:], alpha)
        loss_itm = self.itm_loss(image, text, mask, sim_i2t, sim_t2i)
        loss_mlm = self.mlm_loss(image, ids, mask, teacher and teacher[0], alpha)
        loss_prefix = self.prefix_loss(image, batch)
        loss = (cfg.ita_weight * loss_ita + cfg.itm_weight * loss_itm + cfg.mlm_weight * loss_mlm
                + cfg.prefix_weight * loss_prefix)
        return {"loss": loss, "loss_ita": loss_ita, "loss_itm": loss_itm, "loss_mlm": loss_mlm,
                "loss_prefix": loss_prefix}

    def _teacher_context(self):
        dtype = self.model.dtype
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.model.temp.device.type, dtype=dtype)

    @torch.no_grad()
    def _teacher_forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher image tokens, and its all-gathered image and text features."""
        t = self.teacher.model
        with self._teacher_context():
            image_m = t.encode_image(batch["image"])
            text_m = t.encode_text(batch["text_ids"], batch["text_mask"])
        image_feat, text_feat = t.image_feature(image_m), t.text_feature(text_m)
        with collectives.part("ita"):
            return image_m, all_gather(image_feat), all_gather(text_feat)

    def ita_loss(self, image_feat: torch.Tensor, text_feat: torch.Tensor,
                 teacher: tuple[torch.Tensor, torch.Tensor] | None, alpha: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Contrastive loss over the global batch; returns the loss and this rank's (B × B) similarity blocks.

        Every rank computes the same N × N loss from all-gathered features (gradient flows to its own rows).
        """
        temp = self.model.temperature()
        with collectives.part("ita"):
            all_image, all_text = all_gather_with_grad(image_feat), all_gather_with_grad(text_feat)
        sim_i2t = all_image @ all_text.t() / temp
        sim_t2i = sim_i2t.t()
        targets = torch.eye(sim_i2t.shape[0], device=sim_i2t.device)
        targets_i2t = targets_t2i = targets
        if teacher is not None:
            with torch.no_grad():
                image_m, text_m = teacher
                sim_m = image_m @ text_m.t() / temp
                targets_i2t = alpha * F.softmax(sim_m, dim=1) + (1 - alpha) * targets
                targets_t2i = alpha * F.softmax(sim_m.t(), dim=1) + (1 - alpha) * targets
        loss = (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2
        b = image_feat.shape[0]
        start = b * get_rank()
        local = slice(start, start + b)
        return loss, sim_i2t[local, local].detach(), sim_t2i[local, local].detach()

    def itm_loss(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                 sim_i2t: torch.Tensor, sim_t2i: torch.Tensor) -> torch.Tensor:
        """Matching loss on B positives and 2B hard negatives, all fused in one pass.

        Negatives come from this rank's own similarity block (the reference used rank 0's columns on every
        rank, §12.8, so its negatives were not hard on other ranks).
        """
        with torch.no_grad():
            neg_image = sample_negatives(sim_t2i)  # for each text, a similar but wrong image
            neg_text = sample_negatives(sim_i2t)  # for each image, a similar but wrong text
        images = torch.cat([image, image[neg_image], image], dim=0)
        texts = torch.cat([text, text, text[neg_text]], dim=0)
        masks = torch.cat([mask, mask, mask[neg_text]], dim=0)
        _, fused_text = self.model.fuse(images, texts, masks)
        logits = self.model.itm_head(fused_text[:, 0]).float()
        b = image.shape[0]
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        return F.cross_entropy(logits, labels)

    def mlm_loss(self, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                 teacher_image: torch.Tensor | None, alpha: float) -> torch.Tensor:
        """Masked LM through the fusion encoder, distilled from the teacher's distribution over the vocabulary.

        The reference normalised its soft labels over the sequence axis (§12.4); we use the vocabulary axis.
        Only picked positions go through the MLM head.
        """
        m = self.model
        masked_ids, picked = mask_tokens(ids, self.cfg.mlm_probability, m.cfg.text.vocab_size)
        _, fused = m.fuse(image, m.encode_text(masked_ids, mask), mask)
        logits = m.mlm_head(fused[picked]).float()
        loss = F.cross_entropy(logits, ids[picked])
        if teacher_image is not None:
            with torch.no_grad(), self._teacher_context():
                t = self.teacher.model
                _, fused_m = t.fuse(teacher_image, t.encode_text(masked_ids, mask), mask)
                soft = F.softmax(t.mlm_head(fused_m[picked]).float(), dim=-1)
            loss = (1 - alpha) * loss + alpha * soft_cross_entropy(logits, soft)
        return loss

    def prefix_loss(self, image: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Prefix LM: the decoder continues the caption from the fused (image, caption prefix) memory.

        The reference also ran a momentum decoder whose distillation weight was zero (§12.5); we do not.
        """
        m = self.model
        prefix_mask = batch["prefix_mask"]
        image_out, text_out = m.fuse(image, m.encode_text(batch["prefix_ids"], prefix_mask), prefix_mask)
        memory, memory_mask = m.memory(image_out, text_out, prefix_mask)
        return m.decoder.lm_loss(batch["target_ids"], batch["target_mask"], memory, memory_mask)
