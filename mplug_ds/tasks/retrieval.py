"""Image–text retrieval (COCO / Flickr30K), ALBEF-style (mPLUG §7.3).

Training: contrastive loss against the momentum teacher's features of the global batch plus a feature queue;
every entry with the same image id is a positive (target = normalised indicator, distilled with the teacher's
similarities); matching loss with hard negatives drawn from the in-batch similarities, never of the same image.
Evaluation: contrastive similarities for every pair, top-k candidates per query, re-ranked by the matching
logit (optionally plus the contrastive similarity, as the published video retrieval scores); the similarity rows are
split across ranks and the matching pairs are scored where their image lives. The same module and evaluation serve
video retrieval (``tasks/video_retrieval.py``): a clip is encoded by ``MPLUG.encode_visual`` instead of an image.
"""
from __future__ import annotations

import dataclasses
import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mplug_ds.config import ConfigError
from mplug_ds.data.collate import Preparer, stack_visual, tokenize
from mplug_ds.data.data_config import DataConfig
from mplug_ds.data.sample import Sample
from mplug_ds.data.tokenizer import get_tokenizer
from mplug_ds.data.transforms import TestTransform, pre_caption
from mplug_ds.distributed import all_gather, get_rank, get_world_size, range_over_ranks
from mplug_ds.eval.distributed import all_gather_objects, gather_to_rank0, lockstep_batches
from mplug_ds.eval.pictures import Panel
from mplug_ds.eval.retrieval import chance_recalls, first_hit_ranks, rank_summary, retrieval_recalls
from mplug_ds.models.momentum import MomentumTeacher
from mplug_ds.models.mplug import MPLUG
from mplug_ds.objectives.pretrain import soft_cross_entropy
from mplug_ds.runtime import collectives
from mplug_ds.tasks.base import FUSED, EvalResult, EvalSamples, FinetuneTask
from mplug_ds.tasks.visual import picture, visual_input

SHOWN_TEXTS = 3  # captions per image in the evaluation's picture

Batch = dict[str, torch.Tensor]


@dataclass
class RetrievalConfig:
    """Options of the retrieval objective and its evaluation."""

    queue_size: int = 65536  # momentum features kept as extra negatives; a multiple of the global batch
    momentum: float = 0.995
    alpha: float = 0.4  # distillation weight of the teacher's similarities in the contrastive targets
    itm_weight: float = 1.0
    k_test: int = 256  # contrastive candidates per query re-ranked by the matching head
    # re-ranking score: the matching logit (mPLUG image retrieval) or logit + contrastive similarity (its video
    # retrieval, as published)
    rerank_score: Literal["itm", "itm_plus_itc"] = "itm"


class FeatureQueue:
    """fp32 ring buffer of L2-normalised momentum features with their image ids, identical on every rank.

    Kept outside the DeepSpeed module (no bf16 cast, no partitioning); saved as extra checkpoint state.
    """

    def __init__(self, dim: int, size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)  # same initial queue on every rank, global RNG untouched
        self.image = F.normalize(torch.randn(size, dim, generator=g), dim=1)
        self.text = F.normalize(torch.randn(size, dim, generator=g), dim=1)
        self.idx = torch.full((size,), -100, dtype=torch.long)  # no image id: never a positive
        self.ptr = 0

    def to(self, device: torch.device | str) -> "FeatureQueue":
        self.image, self.text, self.idx = self.image.to(device), self.text.to(device), self.idx.to(device)
        return self

    @torch.no_grad()
    def enqueue(self, image: torch.Tensor, text: torch.Tensor, idx: torch.Tensor) -> None:
        """Replace the oldest entries with a global batch of features (the batch must divide the queue)."""
        n, size = image.shape[0], self.idx.shape[0]
        if size % n:
            raise ValueError(f"queue size {size} is not a multiple of the global batch {n}")
        self.image[self.ptr:self.ptr + n] = image.float()
        self.text[self.ptr:self.ptr + n] = text.float()
        self.idx[self.ptr:self.ptr + n] = idx
        self.ptr = (self.ptr + n) % size

    def state_dict(self) -> dict[str, Any]:
        return {"image": self.image.cpu(), "text": self.text.cpu(), "idx": self.idx.cpu(), "ptr": self.ptr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.image.device
        self.image, self.text, self.idx = (state[k].to(device) for k in ("image", "text", "idx"))
        self.ptr = int(state["ptr"])


def sample_hard_negatives(sim: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """For each row, a column drawn ∝ softmax(sim row) among the columns not excluded (same image).

    A row whose columns are all excluded (every sample of the batch shows its image) falls back to any other
    column. Non-finite similarities become uniform weights, so a diverging step reaches the non-finite guard.
    """
    weights = torch.nan_to_num(F.softmax(sim.float(), dim=1), nan=0.0, posinf=0.0) + 1e-5
    weights = weights.masked_fill(exclude, 0.0)
    empty = weights.sum(dim=1) == 0
    if bool(empty.any()):
        others = ~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        weights[empty] = others[empty].float()
    return torch.multinomial(weights, 1).squeeze(1)


def contrastive_targets(idx: torch.Tensor, bank_idx: torch.Tensor) -> torch.Tensor:
    """Row-normalised indicator of the bank entries that show the same image as each sample ``(B, N + Q)``."""
    positives = (idx[:, None] == bank_idx[None, :]).float()
    return positives / positives.sum(dim=1, keepdim=True).clamp(min=1)


class RetrievalModel(nn.Module):
    """The module DeepSpeed trains for retrieval; its momentum teacher and feature queue live outside it."""

    def __init__(self, model: MPLUG, cfg: RetrievalConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.teacher = MomentumTeacher(model, cfg.momentum)
        self.queue = FeatureQueue(model.cfg.embed_dim, cfg.queue_size)

    def _teacher_context(self):
        dtype = self.model.dtype
        return nullcontext() if dtype == torch.float32 else torch.autocast(self.model.temp.device.type, dtype)

    def forward(self, batch: Batch, alpha: float | None = None, **_: Any) -> dict[str, torch.Tensor]:
        """``loss`` = ``loss_ita`` + itm_weight · ``loss_itm``; ``alpha`` is the current distillation weight."""
        pixels = visual_input(batch)
        if pixels.shape[0] < 2:
            raise ValueError("retrieval needs at least 2 samples per rank (ITM samples in-batch negatives)")
        m, cfg = self.model, self.cfg
        alpha = cfg.alpha if alpha is None else alpha
        idx = batch["image_idx"]
        ids, mask = batch["text_ids"], batch["text_mask"]
        image, image_feat = m.encode_visual(pixels)
        text = m.encode_text(ids, mask)
        text_feat = m.text_feature(text)
        temp = m.temperature()
        with torch.no_grad():
            t = self.teacher.model
            with self._teacher_context():
                image_m = t.encode_visual(pixels).feature
                text_m = t.text_feature(t.encode_text(ids, mask))
            with collectives.part("ita"):
                image_all, text_all, idx_all = all_gather(image_m), all_gather(text_m), all_gather(idx)
            image_bank = torch.cat([image_all, self.queue.image.to(image_all.device)])
            text_bank = torch.cat([text_all, self.queue.text.to(text_all.device)])
            targets = contrastive_targets(idx, torch.cat([idx_all, self.queue.idx.to(idx.device)]))
            targets_i2t = alpha * F.softmax(image_m @ text_bank.t() / temp, dim=1) + (1 - alpha) * targets
            targets_t2i = alpha * F.softmax(text_m @ image_bank.t() / temp, dim=1) + (1 - alpha) * targets
        sim_i2t = image_feat @ text_bank.t() / temp
        sim_t2i = text_feat @ image_bank.t() / temp
        loss_ita = (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2
        loss_itm = self.itm_loss(image, text, mask, image_feat, text_feat, idx, temp)
        self.queue.enqueue(image_all, text_all, idx_all)
        return {"loss": loss_ita + cfg.itm_weight * loss_itm, "loss_ita": loss_ita, "loss_itm": loss_itm}

    def itm_loss(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, image_feat: torch.Tensor,
                 text_feat: torch.Tensor, idx: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
        """Matching loss on B positives and 2B hard negatives (none showing the sample's own image)."""
        with torch.no_grad():
            same = idx[:, None] == idx[None, :]
            sim = image_feat @ text_feat.t() / temp
            neg_text = sample_hard_negatives(sim, same)  # for each image, a similar text of another image
            neg_image = sample_hard_negatives(sim.t(), same)  # for each text, a similar image of another image
        images = torch.cat([image, image[neg_image], image], dim=0)
        texts = torch.cat([text, text, text[neg_text]], dim=0)
        masks = torch.cat([mask, mask, mask[neg_text]], dim=0)
        logits = self.itm_logits(images, texts, masks)
        b = image.shape[0]
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        return F.cross_entropy(logits, labels)

    def itm_logits(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Matching logits ``(B, 2)`` of image tokens and text states fused pairwise."""
        _, fused = self.model.fuse(image, text, mask)
        return self.model.itm_head(fused[:, 0]).float()

    def extra_state(self) -> dict[str, Any]:
        """The queue (the teacher is checkpointed by the engine as the momentum teacher)."""
        return {"queue": self.queue.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.queue.load_state_dict(state["queue"])


# ------------------------------------------------------------------------------------------------------------
# Evaluation: ITC top-k, ITM re-rank, similarity rows sharded across ranks
# ------------------------------------------------------------------------------------------------------------
@dataclass
class RetrievalEvalData:
    """This rank's share of an evaluation set: images or clips (index, ``Preparer.visual`` item) and per image its
    tokenised captions."""

    indices: list[int]
    images: list[dict[str, torch.Tensor]]  # {"image": (3, R, R)} or {"video": (T, 3, R, R) uint8}
    text_ids: list[torch.Tensor]  # one (n_captions, L) tensor per image
    text_mask: list[torch.Tensor]


def _encode(fn: Callable[[list[int]], tuple[torch.Tensor, ...]], n: int, batch_size: int,
            device: torch.device) -> list[torch.Tensor]:
    """Run ``fn`` over positions 0..n-1 in lockstep batches (filler batches dropped); each of its outputs
    concatenated on CPU."""
    outs = []
    for positions, real in lockstep_batches(list(range(n)), batch_size, 0 if n else None, device):
        out = fn(positions)
        if real:
            outs.append([o.cpu() for o in out])
    return [torch.cat(parts) for parts in zip(*outs)] if outs else []


def encode_visuals(model: MPLUG, visual: Mapping[str, torch.Tensor], batch_size: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory tokens (fed to the matching head) and L2-normalised contrastive features of stacked images or clips
    (``{"image": …}`` or ``{"video": …}``, as ``stack_visual`` makes them), on CPU."""
    [(kind, pixels)] = visual.items()
    tokens, feature = _encode(lambda p: model.encode_visual(visual_input({kind: pixels[p]}, device)), len(pixels),
                              batch_size, device)
    return tokens, feature


def encode_texts(model: MPLUG, ids: torch.Tensor, mask: torch.Tensor, batch_size: int, device: torch.device
                 ) -> torch.Tensor:
    """L2-normalised contrastive features of tokenised texts, on CPU."""
    [feature] = _encode(lambda p: (model.text_feature(model.encode_text(ids[p].to(device), mask[p].to(device))),),
                        len(ids), batch_size, device)
    return feature


def top_candidates(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(Q, k)`` of each query's ``k`` most similar bank rows, best first (4,096 query rows at a time)."""
    if not len(queries):
        return torch.empty(0, k, dtype=torch.long)
    return torch.cat([(queries[s:s + 4096] @ bank.t()).topk(k, dim=1).indices for s in range(0, len(queries), 4096)])


def matching_scores(model: MPLUG, tokens: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                    pairs: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """The matching head's "match" logit of each ``(row of tokens, row of text_ids)`` pair ``(P, 2)``, on CPU."""
    def itm(positions: list[int]) -> tuple[torch.Tensor]:
        p = pairs[positions]
        ids, mask = text_ids[p[:, 1]].to(device), text_mask[p[:, 1]].to(device)
        _, fused = model.fuse(tokens[p[:, 0]].to(device), model.encode_text(ids, mask), mask)
        return (model.itm_head(fused[:, 0]).float()[:, 1],)

    [scores] = _encode(itm, len(pairs), batch_size, device) or [torch.empty(0)]
    return scores


def rerank(candidates: list[list[int]], score: Callable[[int, int], float]) -> list[list[int]]:
    """Each query's candidates (contrastive order) sorted by ``score(query, candidate)``, highest first (stable)."""
    return [sorted(c, key=lambda other, q=q: -score(q, other)) for q, c in enumerate(candidates)]


@dataclass
class Ranking:
    """Images against texts: contrastive similarity of every pair, and each side's top-k re-ranked by matching."""

    similarity: torch.Tensor  # (images, texts) cosine similarity of the contrastive features
    image_to_texts: list[list[tuple[int, float]]]  # per image: (text, matching score), best first
    text_to_images: list[list[tuple[int, float]]]  # per text: (image, matching score), best first


@torch.no_grad()
def rank_images_and_texts(model: MPLUG, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                          k_test: int, batch_size: int, device: torch.device) -> Ranking:
    """In this process, what the evaluation ranks: every image against every text, the ``k_test`` most similar by
    the contrastive features re-ranked by the matching head, both ways."""
    tokens, image_feat = encode_visuals(model, {"image": images}, batch_size, device)
    text_feat = encode_texts(model, text_ids, text_mask, batch_size, device)
    i2t = top_candidates(image_feat, text_feat, min(k_test, len(text_feat)))
    t2i = top_candidates(text_feat, image_feat, min(k_test, len(image_feat)))
    pairs = torch.unique(torch.cat([
        torch.stack([torch.arange(len(i2t)).repeat_interleave(i2t.shape[1]), i2t.flatten()], dim=1),
        torch.stack([t2i.flatten(), torch.arange(len(t2i)).repeat_interleave(t2i.shape[1])], dim=1)]), dim=0)
    scores = matching_scores(model, tokens, text_ids, text_mask, pairs, batch_size, device)
    score_of = {(int(i), int(t)): float(v) for (i, t), v in zip(pairs, scores)}
    image_ranking = rerank(i2t.tolist(), lambda i, t: score_of[(i, t)])
    text_ranking = rerank(t2i.tolist(), lambda t, i: score_of[(i, t)])
    return Ranking(similarity=image_feat @ text_feat.t(),
                   image_to_texts=[[(t, score_of[(i, t)]) for t in r] for i, r in enumerate(image_ranking)],
                   text_to_images=[[(i, score_of[(i, t)]) for i in r] for t, r in enumerate(text_ranking)])


@torch.no_grad()
def evaluate_retrieval(model: MPLUG, data: RetrievalEvalData, batch_size: int, k_test: int,
                       device: torch.device, add_itc: bool = False) -> tuple[dict[str, float], dict[str, Any] | None]:
    """TR/IR recall, median and mean rank after ITC top-k + ITM re-ranking (and recall of ITC alone); identical for
    any world size. ``add_itc``: a pair's re-ranking score is its matching logit plus its contrastive similarity.

    Returns ``(metrics, rankings)`` on rank 0 (``rankings``: per image and per text the re-ranked candidate
    indices and scores), ``({}, None)`` elsewhere.
    """
    # One all-reduce: the longest text, and whether some rank got no image (every rank then raises, not one alone).
    fewest, most = range_over_ranks([max((t.shape[1] for t in data.text_ids), default=0), len(data.indices)], device)
    length = most[0]
    if fewest[1] == 0:
        raise ValueError(f"a rank got no evaluation image: the evaluation set needs at least as many images as "
                         f"ranks ({get_world_size()})")
    local_ids = torch.cat([F.pad(t, (0, length - t.shape[1])) for t in data.text_ids])  # pad id and mask are 0
    local_mask = torch.cat([F.pad(t, (0, length - t.shape[1])) for t in data.text_mask])
    local_tokens, local_image_feat = encode_visuals(model, stack_visual(data.images), batch_size, device)
    local_text_feat = encode_texts(model, local_ids, local_mask, batch_size, device)
    # Global order: images by sample index, texts by their image then caption order.
    shared = all_gather_objects({"indices": data.indices, "counts": [len(t) for t in data.text_ids],
                                 "image_feat": local_image_feat, "text_feat": local_text_feat,
                                 "ids": local_ids, "mask": local_mask})
    order = sorted((index, r, j) for r, part in enumerate(shared) for j, index in enumerate(part["indices"]))
    image_pos = {(r, j): g for g, (_, r, j) in enumerate(order)}  # (rank, local image) → global image
    text_to_image, owner_texts = [], []
    for g, (_, r, j) in enumerate(order):
        start = sum(shared[r]["counts"][:j])
        text_to_image += [g] * shared[r]["counts"][j]
        owner_texts += [(r, start + c) for c in range(shared[r]["counts"][j])]
    image_feat = torch.stack([shared[r]["image_feat"][j] for _, r, j in order])
    text_feat = torch.stack([shared[r]["text_feat"][c] for r, c in owner_texts])
    text_ids = torch.stack([shared[r]["ids"][c] for r, c in owner_texts])
    text_mask = torch.stack([shared[r]["mask"][c] for r, c in owner_texts])
    rank = get_rank()
    mine = [image_pos[(rank, j)] for j in range(len(data.indices))]  # global indices of my images
    local_of = {g: j for j, g in enumerate(mine)}
    n_images, n_texts = len(order), len(owner_texts)
    k_i2t, k_t2i = min(k_test, n_texts), min(k_test, n_images)

    # Similarity rows of this rank: its images (i2t) and the texts of its images (t2i), in chunks; with each row's
    # rank of its best positive by similarity alone (where a positive outside the top k ends up)
    owner = torch.tensor(text_to_image)
    i2t_sim = image_feat[mine] @ text_feat.t()
    i2t_top = i2t_sim.topk(k_i2t, dim=1).indices  # (my images, k)
    best = i2t_sim.masked_fill(owner[None, :] != torch.tensor(mine)[:, None], float("-inf")).amax(dim=1)
    i2t_itc_rank = (i2t_sim > best[:, None]).sum(dim=1) + 1
    my_texts = [t for t in range(n_texts) if text_to_image[t] in local_of]  # texts live with their image
    t2i_top, t2i_itc_rank = [torch.empty(0, k_t2i, dtype=torch.long)], [torch.empty(0, dtype=torch.long)]
    for s in range(0, len(my_texts), 4096):
        chunk = my_texts[s:s + 4096]
        sim = text_feat[chunk] @ image_feat.t()
        t2i_top.append(sim.topk(k_t2i, dim=1).indices)
        t2i_itc_rank.append((sim > sim.gather(1, owner[chunk][:, None])).sum(dim=1) + 1)
    t2i_top, t2i_itc_rank = torch.cat(t2i_top), torch.cat(t2i_itc_rank)
    pairs_i2t = torch.stack([torch.tensor(mine).repeat_interleave(k_i2t), i2t_top.flatten()], dim=1)
    pairs_t2i = torch.stack([t2i_top.flatten(), torch.tensor(my_texts).repeat_interleave(k_t2i)], dim=1)
    # Every (image, text) pair is scored by the rank holding the image's tokens.
    routed = torch.cat([pairs_i2t] + [part for part in all_gather_objects(pairs_t2i)])
    is_mine = torch.zeros(n_images, dtype=torch.bool)
    is_mine[mine] = True
    routed = routed[is_mine[routed[:, 0]]]
    pairs = torch.unique(routed, dim=0)
    local_pairs = torch.stack([torch.tensor([local_of[int(i)] for i in pairs[:, 0]], dtype=torch.long),
                               pairs[:, 1]], dim=1)
    scores = matching_scores(model, local_tokens, text_ids, text_mask, local_pairs, batch_size, device)
    if add_itc:
        scores = scores + (image_feat[pairs[:, 0]] * text_feat[pairs[:, 1]]).sum(dim=1)
    gathered = gather_to_rank0({"pairs": pairs, "scores": scores, "i2t": pairs_i2t, "t2i": pairs_t2i,
                                "i2t_rank": dict(zip(mine, i2t_itc_rank.tolist())),
                                "t2i_rank": dict(zip(my_texts, t2i_itc_rank.tolist()))})
    if gathered is None:
        return {}, None
    score_of = {(int(i), int(t)): float(s) for part in gathered for (i, t), s in zip(part["pairs"], part["scores"])}
    itc_image = [[] for _ in range(n_images)]
    itc_text = [[] for _ in range(n_texts)]
    for part in gathered:  # candidates in ITC order (topk order is descending similarity)
        for i, t in part["i2t"].tolist():
            itc_image[i].append(t)
        for i, t in part["t2i"].tolist():
            itc_text[t].append(i)
    image_ranking = rerank(itc_image, lambda i, t: score_of[(i, t)])
    text_ranking = rerank(itc_text, lambda t, i: score_of[(i, t)])
    metrics = retrieval_recalls(image_ranking, text_ranking, text_to_image)
    itc_rank = {direction: {q: r for part in gathered for q, r in part[f"{direction}_rank"].items()}
                for direction in ("i2t", "t2i")}
    texts_of: list[set[int]] = [set() for _ in range(n_images)]
    for t, i in enumerate(text_to_image):
        texts_of[i].add(t)
    for name, ranking, positives, direction in (("tr", image_ranking, texts_of, "i2t"),
                                                ("ir", text_ranking, [{i} for i in text_to_image], "t2i")):
        fallback = [itc_rank[direction][q] for q in range(len(ranking))]
        metrics[f"{name}_mdr"], metrics[f"{name}_mnr"] = rank_summary(first_hit_ranks(ranking, positives, fallback))
    itc = retrieval_recalls(itc_image, itc_text, text_to_image)
    metrics |= {f"itc_{k}": v for k, v in itc.items()}
    metrics |= {"num_images": float(n_images), "num_texts": float(n_texts), "k_test": float(k_test)}
    tokenizer = get_tokenizer()
    rankings = {"text_to_image": text_to_image,
                "image_to_texts": [[(t, score_of[(i, t)]) for t in r] for i, r in enumerate(image_ranking)],
                "text_to_images": [[(i, score_of[(i, t)]) for i in r] for t, r in enumerate(text_ranking)],
                "image_index": [index for index, _, _ in order],  # each image's sample index in the evaluation set
                "texts": tokenizer.batch_decode(text_ids.tolist(), skip_special_tokens=True)}  # as tokenised
    return metrics, rankings


class RetrievalTask(FinetuneTask):
    """COCO / Flickr30K retrieval: TR/IR R@1/5/10 after ITC top-k and ITM re-ranking; ``r_mean`` selects."""

    name = "retrieval"
    sample_task = "retrieval"
    loss_keys = ("loss", "loss_ita", "loss_itm")
    metric = "r_mean"
    config_type = RetrievalConfig
    required_fields = ("texts",)
    uses = (*FUSED, "vision_proj.", "text_proj.", "itm_head.", "temp")
    shown = "image"  # what the picture calls a sample

    def build(self, model: MPLUG) -> RetrievalModel:
        return RetrievalModel(model, self.cfg)

    def format_metric(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> str:
        parts = []
        for key, label in (("tr_r1", "TR R@1"), ("ir_r1", "IR R@1"), ("r_mean", "mean recall")):
            value, chance = metrics.get(key, float("nan")), baseline.get(key, float("nan"))
            ratio = f" = {value / chance:.1f}×" if chance > 0 else ""
            parts.append(f"{label} {value:.2f} vs chance {chance:.2f}{ratio}")
        return "; ".join(parts)

    def check_run(self, micro_batch: int, global_batch: int) -> None:
        if micro_batch < 2:
            raise ConfigError("batch.micro_batch_per_gpu must be >= 2 for retrieval (ITM draws in-batch negatives)")
        if self.cfg.queue_size < global_batch or self.cfg.queue_size % global_batch:
            raise ConfigError(f"task.options.queue_size={self.cfg.queue_size} must be a multiple of the global batch "
                              f"{global_batch} (micro batch × ranks); e.g. {global_batch * max(1, self.cfg.queue_size // global_batch)}")
        if self.cfg.k_test < 10:
            raise ConfigError(f"task.options.k_test={self.cfg.k_test} must be >= 10 (R@10 needs 10 candidates)")

    @staticmethod
    def prepare_image(image: Image.Image, data: DataConfig) -> torch.Tensor:
        """An image as evaluation prepares it: resized to the model's resolution, normalised."""
        return TestTransform(data.image_res)(image)

    @staticmethod
    def prepare_texts(texts: list[str], data: DataConfig) -> list[str]:
        """Texts as evaluation prepares them (normalised and cut to ``max_words``; may become empty)."""
        return [pre_caption(t, data.max_words) for t in texts]

    @torch.no_grad()
    def rank(self, model: MPLUG, images: list[Image.Image], texts: list[str], data: DataConfig, batch_size: int,
             device: torch.device) -> Ranking:
        """Every image against every text in this process, prepared and ranked as the evaluation does (the
        evaluation ranks ``module.model``: only the MPLUG is needed, not the teacher and queue of training)."""
        prepared = self.prepare_texts(texts, data)
        empty = [i for i, t in enumerate(prepared) if not t]
        if empty:
            raise ValueError(f"text {empty[0]} ({texts[empty[0]]!r}) has no words left after normalisation")
        ids, mask = tokenize(prepared, data.max_len)
        pixels = torch.stack([self.prepare_image(image, data) for image in images])
        return rank_images_and_texts(model, pixels, ids, mask, self.cfg.k_test, batch_size, device)

    @torch.no_grad()
    def evaluate(self, module: nn.Module, samples: EvalSamples, data: DataConfig, batch_size: int,
                 device: torch.device) -> EvalResult:
        prepare = Preparer(dataclasses.replace(data, task="retrieval", train=False))
        eval_data = RetrievalEvalData([], [], [], [])
        for index, sample in samples:
            captions = [c for c in self.prepare_texts(sample.texts, data) if c]
            if (sample.image is None and sample.video is None) or not captions:
                raise ValueError(f"evaluation sample {sample.key} needs an image (or video) and at least one caption")
            ids, mask = tokenize(captions, data.max_len)
            eval_data.indices.append(index)
            eval_data.images.append(prepare.visual(sample, random.Random(index)))  # images: ``prepare_image``
            eval_data.text_ids.append(ids)
            eval_data.text_mask.append(mask)
        metrics, rankings = evaluate_retrieval(module.model, eval_data, batch_size, self.cfg.k_test, device,
                                               add_itc=self.cfg.rerank_score == "itm_plus_itc")
        if rankings is None:
            return EvalResult()
        baseline = chance_recalls(rankings["text_to_image"], int(metrics["num_images"]))
        return EvalResult(metrics=metrics, baseline={k: baseline[k] for k in ("r_mean", "tr_r1", "ir_r1")},
                          results=rankings,
                          predictions=retrieved_texts(rankings, SHOWN_TEXTS))

    def panel(self, sample: Sample, prediction: dict[str, Any]) -> Panel:
        """``prediction["texts"]``: (text, score, whether it is a caption of this sample; ``None``: not known)."""
        marks = {True: "✓", False: "✗", None: "·"}
        lines = [f"{marks[right]} {text} ({score:.2f})" for text, score, right in prediction["texts"]]
        return Panel(images=picture(sample), lines=[f"captions retrieved for this {self.shown}:", *lines],
                     correct=prediction["texts"][0][2] if prediction["texts"] else None)


def retrieved_texts(rankings: dict[str, Any], top: int) -> list[dict[str, Any]]:
    """Per image (by sample ``index``): its ``top`` re-ranked captions as (text, score, a caption of this image)."""
    texts, owner = rankings["texts"], rankings["text_to_image"]
    return [{"index": index, "texts": [(texts[t], score, owner[t] == g) for t, score in ranked[:top]]}
            for g, (index, ranked) in enumerate(zip(rankings["image_index"], rankings["image_to_texts"]))]
