"""ITA over all-gathered features: 2 gloo ranks with batch B == 1 process with batch 2B (loss and gradients)."""
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mplug_ds.models.config import load_model_config
from mplug_ds.models.mplug import build_model
from mplug_ds.objectives.pretrain import PretrainConfig, PretrainModel
from mplug_ds.runtime.launch_env import free_port
from tests.model_utils import pretrain_batch
from tests.processes import timeout

pytestmark = pytest.mark.slow  # multi-process runs

B = 3


def _ita_loss_and_grads(objective, batch):
    model = objective.model
    image = model.encode_image(batch["image"])
    text = model.encode_text(batch["text_ids"], batch["text_mask"])
    teacher = objective._teacher_forward(batch)
    loss, _, _ = objective.ita_loss(model.image_feature(image), model.text_feature(text), teacher[1:], alpha=0.4)
    model.zero_grad()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach(), grads


def _setup():
    torch.manual_seed(0)
    model = build_model(load_model_config("tiny", ["text.hidden_dropout=0", "text.attn_dropout=0"])).eval()
    return PretrainModel(model, PretrainConfig()), pretrain_batch(batch_size=2 * B)


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    objective, batch = _setup()
    local = {k: v[rank * B:(rank + 1) * B] for k, v in batch.items()}
    loss, grads = _ita_loss_and_grads(objective, local)
    dist.all_reduce(grads)
    torch.save({"loss": loss, "grads": grads / 2}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_with_batch_b_match_one_process_with_batch_2b(tmp_path):
    ranks = mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    try:
        deadline = time.monotonic() + timeout(300)
        while not ranks.join(timeout=1):
            assert time.monotonic() < deadline, "the two ranks did not finish in time"
    finally:
        for process in ranks.processes:
            process.kill()
            process.join()
    objective, batch = _setup()
    loss, grads = _ita_loss_and_grads(objective, batch)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(result["loss"], loss, atol=1e-6)
        # fp32 sums in another order (1 thread per rank here, 2 in this process): differences of a few ulps
        assert (result["grads"] - grads).abs().max() < 5e-6 * max(1.0, grads.abs().max().item())
