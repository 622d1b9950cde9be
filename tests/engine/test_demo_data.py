"""The demo cache is keyed by the world it holds: a changed demo world is generated afresh, never read stale."""
import pytest

from mplug_ds.data import demo_shards as demo_data
from mplug_ds.data.demo_shards import demo_shards, prepare_demo_shards, world_fingerprint


@pytest.fixture
def small_world(monkeypatch):
    monkeypatch.setattr(demo_data, "DEMO_IMAGES", 16)
    world_fingerprint.cache_clear()
    yield
    world_fingerprint.cache_clear()


def test_a_changed_world_does_not_reuse_the_cached_shards(tmp_path, small_world, monkeypatch):
    first = prepare_demo_shards(tmp_path)
    assert first.train_samples == 12 and first.test_samples == 2
    assert prepare_demo_shards(tmp_path) == first  # same world: reused

    monkeypatch.setattr(demo_data, "DEMO_SEED", demo_data.DEMO_SEED + 1)  # stands for any change of the world
    world_fingerprint.cache_clear()
    assert demo_shards(tmp_path) is None
    second = prepare_demo_shards(tmp_path)
    assert second.train != first.train and second.train_samples == 12
