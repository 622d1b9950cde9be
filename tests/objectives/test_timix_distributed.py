"""TiMix soft targets and mixed loss: 2 gloo ranks with batch B == 1 process with the concatenated batch 2B
(same pairing: rank r's partners shifted by r·B), for the label mode that depends on everything (relevance
weights over model predictions, per-sample window sides, random derangements)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mplug_ds.objectives.timix_mixing import plan_mix, standardize
from tests.model_utils import pretrain_batch
from tests.objectives.test_timix import timix_objective

B = 3
SIDES = torch.tensor([1, 3, 2, 2, 1, 3])
PARTNERS = [torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])]  # a derangement per rank


def _mixed_loss(objective, batch, partners, sides):
    m = objective.model
    image, tapped = m.encode_image_tapped(batch["image"])
    text = m.encode_text(batch["text_ids"], batch["text_mask"])
    probs = objective.relevance(tapped, text)
    plan = plan_mix(standardize(probs.log()), sides, partners)
    mix = objective.prepare_mix(batch["image"], tapped, image, text, plan)
    share, y_i2t, y_t2i = objective.targets(mix)
    loss, _ = objective.mixed_loss(mix, m.text_feature(text))
    m.zero_grad()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    return {"loss": loss.detach(), "grads": grads, "y_i2t": y_i2t, "y_t2i": y_t2i}


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    objective = timix_objective(label_mode="relevance_pred")
    batch = pretrain_batch(batch_size=2 * B)
    local = {k: v[rank * B:(rank + 1) * B] for k, v in batch.items()}
    result = _mixed_loss(objective, local, PARTNERS[rank], SIDES[rank * B:(rank + 1) * B])
    dist.all_reduce(result["grads"])
    result["grads"] /= 2
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_give_the_labels_and_mixed_loss_of_one_process_with_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    objective = timix_objective(label_mode="relevance_pred")
    partners = torch.cat([PARTNERS[0], PARTNERS[1] + B])
    single = _mixed_loss(objective, pretrain_batch(batch_size=2 * B), partners, SIDES)
    assert not torch.allclose(single["y_i2t"], single["y_t2i"].t())  # the two directions really differ
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for key in ("y_i2t", "y_t2i"):
            assert torch.allclose(result[key], single[key], atol=1e-5), key
        assert torch.allclose(result["loss"], single["loss"], atol=1e-5)
        assert (result["grads"] - single["grads"]).abs().max() < 1e-5 * max(1.0, single["grads"].abs().max().item())
