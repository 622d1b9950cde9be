"""The three video tasks on tiny clips: a training step of each reaches the ViT and the temporal embedding. (Their
2-rank = 1-rank evaluation is in the shared runs of tests/tasks/test_task_evaluation_runs.py.)"""
import dataclasses
import random

import pytest
import torch

from mplug_ds.data.collate import Preparer, collate
from mplug_ds.data.data_config import DataConfig, SourceConfig
from mplug_ds.data.reading import iter_samples
from mplug_ds.models.config import load_model_config
from mplug_ds.models.mplug import build_model
from mplug_ds.tasks import build_task
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
