"""The engine's data sources over real demo shards: endless stream, exact position restore, held-out set."""
import pytest
import torch

from mplug_ds.config import ConfigError
from mplug_ds.data.streams import EndlessShardBatches, build_eval_set, build_train_stream, pipeline_config
from mplug_ds.engine.train_config import load_train_config
from mplug_ds.models.config import load_model_config
from mplug_ds.runtime.launch_env import WorldInfo

WORLD = WorldInfo(rank=0, local_rank=0, world_size=1)


@pytest.fixture(scope="module")
def demo_cfg(tmp_path_factory):
    cache = tmp_path_factory.mktemp("demo_cache")
    return load_train_config("demo", [f"data.cache_dir={cache}", "batch.micro_batch_per_gpu=8",
                                      "eval.max_samples=12"])


def test_demo_stream_restores_its_position_exactly(demo_cfg):
    model = load_model_config("tiny")
    stream = build_train_stream(demo_cfg, model, WORLD)
    assert isinstance(stream, EndlessShardBatches)
    data = iter(stream)
    first = [next(data) for _ in range(3)]
    assert set(first[0]) == {"image", "text_ids", "text_mask", "prefix_ids", "prefix_mask", "target_ids",
                             "target_mask"}
    assert first[0]["image"].shape == (8, 3, 64, 64)
    state = stream.state_dict()
    torch.manual_seed(123)
    expected = [next(data) for _ in range(2)]
    after_expected = torch.rand(1)

    restored = build_train_stream(demo_cfg, model, WORLD)
    restored.load_state_dict(state)
    torch.manual_seed(123)
    again = iter(restored)
    got = [next(again) for _ in range(2)]
    for a, b in zip(expected, got):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.rand(1), after_expected)  # starting the loader did not consume the training RNG


def test_demo_held_out_set_pairs_every_caption_with_its_image(demo_cfg):
    model = load_model_config("tiny")
    held_out = build_eval_set(demo_cfg, model, WORLD)
    assert held_out.images.shape == (12, 3, 64, 64)
    assert len(held_out.text_ids) == len(held_out.text_to_image) > 12
    assert sorted(set(held_out.text_to_image.tolist())) == list(range(12))


def test_pipeline_fields_owned_by_the_engine_must_not_disagree():
    cfg = load_train_config("demo", ["data.pipeline.batch_size=3"])
    with pytest.raises(ConfigError, match=r"data\.pipeline\.batch_size=3"):
        pipeline_config(cfg, load_model_config("tiny"))
