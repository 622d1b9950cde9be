"""The pre-training streams over real demo shards and synthetic data: endless, exact position restore, held-out set,
and one batch layout (``CaptionBatch``) whatever the source."""
import dataclasses

import pytest
import torch

from mplug_ds.config import ConfigError
from mplug_ds.data.batch import CAPTION_TENSORS
from mplug_ds.data.streams import EndlessShardBatches, build_eval_set, build_train_stream
from mplug_ds.data.synthetic import SyntheticPretrainBatches
from mplug_ds.objectives.pretrain_config import load_train_config
from mplug_ds.runtime.launch_env import WorldInfo

WORLD = WorldInfo(rank=0, local_rank=0, world_size=1)
RES, PATCH = 64, 16


@pytest.fixture(scope="module")
def demo_data(demo_cache):
    return load_train_config("demo", [f"data.cache_dir={demo_cache}"]).data  # the demo's own pipeline settings


def test_demo_stream_restores_its_position_exactly(demo_data):
    stream = build_train_stream(demo_data, 8, RES, PATCH, WORLD)
    assert isinstance(stream, EndlessShardBatches)
    data = iter(stream)
    first = [next(data) for _ in range(3)]
    assert set(first[0]) == set(CAPTION_TENSORS)
    assert first[0]["image"].shape == (8, 3, RES, RES)
    state = stream.state_dict()
    torch.manual_seed(123)
    expected = [next(data) for _ in range(2)]
    after_expected = torch.rand(1)

    restored = build_train_stream(demo_data, 8, RES, PATCH, WORLD)
    restored.load_state_dict(state)
    torch.manual_seed(123)
    again = iter(restored)
    got = [next(again) for _ in range(2)]
    for a, b in zip(expected, got):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.rand(1), after_expected)  # starting the loader did not consume the training RNG


def test_demo_held_out_set_pairs_every_caption_with_its_image(demo_data):
    held_out = build_eval_set(demo_data, RES, 12, WORLD)
    assert held_out.images.shape == (12, 3, RES, RES)
    assert len(held_out.text_ids) == len(held_out.text_to_image) > 12
    assert sorted(set(held_out.text_to_image.tolist())) == list(range(12))


@pytest.mark.parametrize("text_len", [30, 16])
def test_synthetic_and_shard_batches_share_layout_and_padding(demo_data, text_len):
    """``--text-len 30`` means 30 tokens per caption reach the model, as in a training batch from shards."""
    synthetic = next(iter(SyntheticPretrainBatches(4, RES, text_len, seed=0, rank=0)))
    demo = dataclasses.replace(demo_data, max_text_len=text_len)
    shards = next(iter(build_train_stream(demo, 4, RES, PATCH, WORLD)))
    for batch in (synthetic, shards):
        assert set(batch) == set(CAPTION_TENSORS)
        for field in ("text", "prefix", "target"):
            ids, mask = batch[f"{field}_ids"], batch[f"{field}_mask"]
            assert ids.shape == mask.shape and ids.shape[0] == 4
            assert mask.sum(dim=1).max() == ids.shape[1] <= text_len  # padded to the longest text, as in training
    assert synthetic["text_mask"].sum(dim=1).eq(text_len).all()  # every synthetic caption is text_len tokens
    assert synthetic["target_ids"].gather(1, synthetic["target_mask"].sum(1, keepdim=True) - 2).eq(102).all()


@pytest.mark.parametrize("key", ["batch_size", "image_res", "patch_size", "max_len", "task", "train"])
def test_pipeline_keys_the_run_sets_are_rejected_by_name(key):
    """They would be silently overwritten (by the batch size, the model, max_text_len, pre-training captions)."""
    with pytest.raises(ConfigError, match=rf"unknown config key 'data\.pipeline\.{key}'"):
        load_train_config("demo", [f"data.pipeline.{key}=1"])
