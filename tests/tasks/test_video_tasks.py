"""The three video tasks on tiny clips: a training step of each reaches the ViT and the temporal embedding, and the
evaluation on 2 ranks (gloo) gives exactly the 1-rank metrics and results on an odd number of videos."""
import dataclasses
import json
import os
import random
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mplug_ds.data.collate import Preparer, collate
from mplug_ds.data.data_config import DataConfig, SourceConfig
from mplug_ds.data.reading import iter_samples
from mplug_ds.models.config import load_model_config
from mplug_ds.models.mplug import build_model
from mplug_ds.runtime.launch_env import free_port
from mplug_ds.tasks import build_task
from mplug_ds.tasks.evaluation import run_evaluation
from tests.processes import timeout
from tests.video_data import write_video_shards

TASKS = {"video_retrieval": ("video_caption", {"k_test": 10, "queue_size": 6}),
         "video_caption": ("video_caption", {"num_beams": 2, "min_length": 1, "max_length": 4}),
         "video_qa": ("video_qa", {"mode": "rank", "k_test": 3})}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_tasks")
    return {kind: write_video_shards(root / kind, kind, [4, 3]) for kind in ("video_caption", "video_qa")}


def _setup(name, shards):
    """(task, module, data config) of one task on the tiny model with a temporal embedding, seeded alike."""
    kind, options = TASKS[name]
    task = build_task(name, options)
    torch.manual_seed(0)
    model = build_model(load_model_config("tiny", ["video.temporal_embedding=true", "video.max_frames=4",
                                                   "text.hidden_dropout=0", "text.attn_dropout=0"]))
    with torch.no_grad():
        model.temporal_pos_embed.normal_(std=0.5)  # as if trained: frame order matters
    data = DataConfig(task=task.sample_task, train=False, image_res=64, patch_size=16, max_len=12, num_frames=4,
                      sources=[SourceConfig("train", shards[kind])], scale_min=1.0, augment=False, batch_size=3)
    return task, task.build(model), data


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_training_step_on_clips_reaches_the_vit_and_the_temporal_embedding(shards, name):
    task, module, data = _setup(name, shards)
    data = dataclasses.replace(data, train=True, questions_per_video=2)
    prepare = Preparer(data)
    items = [prepare(s, random.Random(i)) for i, s in enumerate(iter_samples(shards[TASKS[name][0]]))][:3]
    batch = {k: v for k, v in collate(items, data).items() if isinstance(v, torch.Tensor)}
    assert batch["video"].dtype == torch.uint8 and batch["video"].shape == (3, 4, 3, 64, 64)
    loss = module(batch)["loss"]
    loss.backward()
    model = module.model
    assert torch.isfinite(loss)
    assert model.temporal_pos_embed.grad.abs().sum() > 0
    assert model.visual.vit.patch_embed.proj.weight.grad.abs().sum() > 0


def _worker(rank, port, shards, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    for name in TASKS:
        task, module, data = _setup(name, shards)
        path = Path(out_dir) / f"{name}.json" if rank == 0 else None
        run_evaluation(task, module, shards[TASKS[name][0]], data, 2, None, torch.device("cpu"), path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_evaluation_equals_one_rank_for_every_video_task(shards, tmp_path):
    ranks = mp.spawn(_worker, args=(free_port(), shards, str(tmp_path / "two")), nprocs=2, join=False)
    try:
        deadline = time.monotonic() + timeout(600)
        while not ranks.join(timeout=1):
            assert time.monotonic() < deadline, "the two ranks did not finish in time"
    finally:
        for process in ranks.processes:
            process.kill()
    for name in TASKS:
        task, module, data = _setup(name, shards)
        one = run_evaluation(task, module, shards[TASKS[name][0]], data, 2, None, torch.device("cpu"),
                             tmp_path / "one" / f"{name}.json")
        two = json.loads((tmp_path / "two" / f"{name}.json").read_text())
        reference = json.loads((tmp_path / "one" / f"{name}.json").read_text())
        assert two["metrics"] == reference["metrics"] and two["baseline"] == reference["baseline"], name
        if name == "video_retrieval":  # the same candidates in the same order (scores may differ in the last bits)
            for key in ("image_to_texts", "text_to_images"):
                assert ([[c for c, _ in ranked] for ranked in two["results"][key]]
                        == [[c for c, _ in ranked] for ranked in reference["results"][key]])
        else:  # the same answer to every question, the same caption for every clip
            assert two["results"] == reference["results"], name
        assert (tmp_path / "two" / f"{name}.png").is_file()  # the picture: frame strips with predictions
        if name == "video_qa":
            assert one.metrics["num_videos"] == 7 and one.metrics["num_scored"] == 13  # 1, 2, 3, 1, 2, 3, 1 questions
            assert [r["question_id"] for r in two["results"]] == sorted(r["question_id"] for r in two["results"])
        elif name == "video_retrieval":
            assert one.metrics["num_videos"] == 7 and {"t2v_r1", "v2t_r1", "t2v_mdr", "v2t_mnr"} <= set(one.metrics)
        else:
            assert one.metrics["num_videos"] == 7 and "cider" in one.metrics
