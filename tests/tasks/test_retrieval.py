"""Retrieval: same-image positives, queue, hard negatives, and ITC top-k + ITM re-rank against brute force."""
import statistics

import pytest
import torch

from mplug_ds.data.collate import tokenize
from mplug_ds.eval.retrieval import chance_recalls, retrieval_recalls
from mplug_ds.models.mplug import build_model
from mplug_ds.tasks.retrieval import (
    RetrievalConfig,
    RetrievalEvalData,
    RetrievalModel,
    contrastive_targets,
    evaluate_retrieval,
    sample_hard_negatives,
)


def test_same_image_texts_are_all_positives():
    idx = torch.tensor([7, 3, 7])
    bank = torch.tensor([7, 3, 7, -100, 7, 5])  # batch (gathered) then queue
    targets = contrastive_targets(idx, bank)
    assert targets[0].tolist() == pytest.approx([1 / 3, 0, 1 / 3, 0, 1 / 3, 0])
    assert targets[1].tolist() == pytest.approx([0, 1, 0, 0, 0, 0])
    assert torch.allclose(targets.sum(dim=1), torch.ones(3))


def test_hard_negatives_never_show_the_same_image():
    torch.manual_seed(0)
    idx = torch.tensor([1, 1, 2, 3, 3, 3])
    same = idx[:, None] == idx[None, :]
    sim = torch.randn(6, 6) * 5
    sim[same] = 50.0  # same-image pairs are the most similar: they would be drawn if not excluded
    for _ in range(50):
        neg = sample_hard_negatives(sim, same)
        assert (idx[neg] != idx).all()
    all_same = torch.ones(3, 3, dtype=torch.bool)
    assert (sample_hard_negatives(torch.zeros(3, 3), all_same) != torch.arange(3)).all()


def _retrieval_batch(idx):
    ids, mask = tokenize([f"a red circle number {i}" for i in range(len(idx))], 12)
    return {"image": torch.randn(len(idx), 3, 64, 64), "text_ids": ids, "text_mask": mask,
            "image_idx": torch.tensor(idx)}


def test_forward_losses_and_queue_fill():
    torch.manual_seed(0)
    module = RetrievalModel(build_model("tiny"), RetrievalConfig(queue_size=8))
    out = module(_retrieval_batch([11, 12, 11, 13]), alpha=0.4)
    assert set(out) == {"loss", "loss_ita", "loss_itm"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert module.queue.idx.tolist()[:4] == [11, 12, 11, 13] and module.queue.ptr == 4
    module(_retrieval_batch([1, 2, 3, 4]))
    assert module.queue.ptr == 0 and module.queue.idx.tolist() == [11, 12, 11, 13, 1, 2, 3, 4]
    state = module.extra_state()
    other = RetrievalModel(build_model("tiny"), RetrievalConfig(queue_size=8))
    other.load_extra_state(state)
    assert torch.equal(other.queue.text, module.queue.text) and other.queue.ptr == 0
    with pytest.raises(ValueError, match="not a multiple"):
        module(_retrieval_batch([1, 2, 3]))


def test_recalls_and_chance():
    # 2 images, texts 0,1 → image 0, text 2 → image 1
    metrics = retrieval_recalls([[2, 0, 1], [2, 1, 0]], [[1, 0], [0, 1], [1, 0]], [0, 0, 1])
    assert metrics["tr_r1"] == 50.0 and metrics["ir_r1"] == pytest.approx(200 / 3)
    assert metrics["tr_r5"] == 100.0
    chance = chance_recalls([i // 5 for i in range(500)], 100)
    assert chance["ir_r1"] == pytest.approx(1.0) and chance["tr_r1"] == pytest.approx(1.0)
    assert chance["ir_r5"] == pytest.approx(5.0) and 4.9 < chance["tr_r5"] < 5.0  # 5 draws without replacement


@pytest.mark.parametrize("add_itc", [False, True])
def test_topk_rerank_matches_brute_force_on_one_rank(add_itc):
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    n_images, captions = 7, [2, 3, 1, 2, 2, 1, 3]
    data = RetrievalEvalData([], [], [], [])
    texts = []
    for i, c in enumerate(captions):
        caps = [f"caption {j} of picture {i}" for j in range(c)]
        texts += caps
        ids, mask = tokenize(caps, 12)
        data.indices.append(i)
        data.images.append({"image": torch.randn(3, 64, 64)})
        data.text_ids.append(ids)
        data.text_mask.append(mask)
    k = 3
    metrics, rankings = evaluate_retrieval(model, data, batch_size=4, k_test=k, device=torch.device("cpu"),
                                           add_itc=add_itc)
    with torch.no_grad():  # brute force: every pair's ITC similarity and ITM logit (+ similarity: the video score)
        images = torch.stack([d["image"] for d in data.images])
        ids, mask = torch.cat(data.text_ids), torch.cat(data.text_mask)
        tokens = model.encode_image(images)
        states = model.encode_text(ids, mask)
        sim = model.image_feature(tokens) @ model.text_feature(states).t()
        itm = torch.zeros(n_images, len(texts))
        for i in range(n_images):
            _, fused = model.fuse(tokens[i:i + 1].expand(len(texts), -1, -1), states, mask)
            itm[i] = model.itm_head(fused[:, 0])[:, 1] + (sim[i] if add_itc else 0)
    owner = [i for i, c in enumerate(captions) for _ in range(c)]
    expect_i2t = [sorted(sim[i].topk(k).indices.tolist(), key=lambda t, i=i: -itm[i, t]) for i in range(n_images)]
    expect_t2i = [sorted(sim[:, t].topk(k).indices.tolist(), key=lambda i, t=t: -itm[i, t]) for t in range(len(texts))]
    assert [[t for t, _ in r] for r in rankings["image_to_texts"]] == expect_i2t
    assert [[i for i, _ in r] for r in rankings["text_to_images"]] == expect_t2i
    assert rankings["text_to_image"] == owner
    assert metrics == pytest.approx({**metrics, **retrieval_recalls(expect_i2t, expect_t2i, owner)})
    assert metrics["num_images"] == n_images and metrics["num_texts"] == len(texts)
    # median / mean rank of the first positive: its place among the re-ranked k, else its place by similarity alone
    i2t_ranks = [next((r + 1 for r, t in enumerate(expect_i2t[i]) if owner[t] == i), None)
                 or 1 + int((sim[i] > sim[i, [t for t in range(len(texts)) if owner[t] == i]].max()).sum())
                 for i in range(n_images)]
    t2i_ranks = [expect_t2i[t].index(owner[t]) + 1 if owner[t] in expect_t2i[t]
                 else 1 + int((sim[:, t] > sim[owner[t], t]).sum()) for t in range(len(texts))]
    assert (metrics["tr_mdr"], metrics["tr_mnr"]) == pytest.approx((statistics.median(i2t_ranks),
                                                                    statistics.fmean(i2t_ranks)))
    assert (metrics["ir_mdr"], metrics["ir_mnr"]) == pytest.approx((statistics.median(t2i_ranks),
                                                                    statistics.fmean(t2i_ranks)))
    assert max(t2i_ranks) > k  # some first positives lie beyond the re-ranked candidates
