"""TiMix's region stream: demo region shards of the train images only, joined to caption batches, exact resume."""
import itertools
import json

import pytest
import torch

from mplug_ds.data.data_config import DataConfig, SourceConfig
from mplug_ds.data.pipeline import ShardLoader
from mplug_ds.data.reading import iter_samples
from mplug_ds.data.region_streams import SyntheticRegionBatches, WithRegions, region_pipeline_config
from mplug_ds.data.streams import EndlessShardBatches
from mplug_ds.data.demo_shards import prepare_demo_shards, world_dir


@pytest.fixture(scope="module")
def demo(demo_cache):
    return demo_cache, prepare_demo_shards(demo_cache, regions=True)  # already there: read back


def _stream(cache, pattern, split, task, batch):
    manifest = world_dir(cache) / "shards" / split / "manifest.json"
    cfg = DataConfig(sources=[SourceConfig(split, pattern, manifest=str(manifest))],
                     task=task, batch_size=batch, num_workers=1, image_res=64, patch_size=8, max_len=16,
                     shuffle_buffer=20, shuffle_initial=5)
    if task == "region":
        cfg = region_pipeline_config(cfg, batch, 64, 8, 16)
    return EndlessShardBatches(ShardLoader(cfg, 0, 1))


def test_demo_region_shards_hold_train_images_only(demo):
    cache, shards = demo
    train_images = {s.image_id for s in iter_samples(shards.train)}
    region_images = [s.image_id for s in iter_samples(shards.regions)]
    assert region_images and set(region_images) <= train_images
    manifest = world_dir(cache) / "shards" / "regions" / "manifest.json"
    assert json.loads(manifest.read_text())["total_samples"] == len(region_images)


def test_caption_batches_carry_region_batches_and_resume_exactly(demo):
    cache, shards = demo

    def joined():
        return WithRegions(_stream(cache, shards.train, "train", "caption", 4),
                           _stream(cache, shards.regions, "regions", "region", 3))

    stream = joined()
    first = list(itertools.islice(iter(stream), 2))
    batch = first[0]
    phrases = batch["region_text_ids"].shape[0]
    assert batch["image"].shape == (4, 3, 64, 64) and batch["region_image"].shape == (3, 3, 64, 64)
    assert batch["patch_labels"].shape == (phrases, 64) and batch["region_image_index"].max() == 2
    assert (batch["patch_labels"].sum(dim=1) >= 1).all()
    state = stream.state_dict()
    expected = list(itertools.islice(iter(stream), 2))
    resumed = joined()
    resumed.load_state_dict(state)
    for a, b in zip(expected, itertools.islice(iter(resumed), 2)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="not saved by a TiMix run"):
        joined().load_state_dict(state["captions"])


def test_synthetic_region_batches_are_a_pure_function_of_the_position():
    stream = SyntheticRegionBatches(images=3, image_size=64, patch_size=16, max_text_len=12, seed=1, rank=0)
    batches = list(itertools.islice(iter(stream), 2))
    again = SyntheticRegionBatches(3, 64, 16, 12, seed=1, rank=0)
    again.load_state_dict({"next_index": 1})
    resumed = next(iter(again))
    assert all(torch.equal(batches[1][k], resumed[k]) for k in batches[1])
    assert not torch.equal(batches[0]["image"], batches[1]["image"])
    assert batches[0]["patch_labels"].shape == (12, 16)
    assert batches[0]["region_image_index"].tolist()[:5] == [0] * 4 + [1]
