"""Model structure: fusion schedules, KV-cached decoding, parameter counts of the named sizes."""
import json
import sys

import pytest
import torch

from mplug_ds.config import ConfigError
from mplug_ds.data.tokenizer import CLS_ID, SEP_ID
from mplug_ds.models.param_count import parameter_report
from mplug_ds.models.config import load_model_config
from mplug_ds.models.fusion import FusionEncoder, connected_layers
from mplug_ds.models.generation import greedy_decode
from mplug_ds.models.mplug import build_model
from tests.processes import REPO as ROOT
from tests.processes import run_checked


def test_official_schedule_matches_released_checkpoints_and_paper_schedule_repeats():
    assert connected_layers(6, 3, "official") == [False, False, False, True, False, False]  # base
    assert connected_layers(6, 6, "official") == [False] * 6  # large: no connected layer runs
    assert connected_layers(6, 2, "official") == [False, False, True, False, True, False]
    assert connected_layers(6, 2, "paper") == [False, False, True, False, False, True]


def test_image_stream_changes_only_through_connected_layers():
    cfg = load_model_config("tiny", ["text.hidden_dropout=0", "text.attn_dropout=0"]).text
    torch.manual_seed(0)
    image, text, mask = torch.randn(2, 5, 64), torch.randn(2, 4, 64), torch.ones(2, 4, dtype=torch.long)
    co_only = FusionEncoder(cfg, num_layers=3, stride=6, schedule="official").eval()
    out_image, _ = co_only(image, text, mask)
    assert torch.equal(out_image, image)
    assert all(layer.crossattention is not None for layer in co_only.encoder.layer)
    skip = FusionEncoder(cfg, num_layers=4, stride=3, schedule="official").eval()
    assert skip.encoder.layer[3].crossattention is None  # a connected layer builds no dead cross-attention
    out_image, _ = skip(image, text, mask)
    assert not torch.allclose(out_image, image)


def test_kv_cached_greedy_decoding_equals_full_recomputation():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    memory = torch.randn(3, 9, 64)
    memory_mask = torch.ones(3, 9, dtype=torch.long)
    memory_mask[1, 6:] = 0
    prompt = torch.full((3, 1), CLS_ID)
    cached = greedy_decode(model.decoder, memory, memory_mask, prompt, 12, SEP_ID, use_cache=True)
    full = greedy_decode(model.decoder, memory, memory_mask, prompt, 12, SEP_ID, use_cache=False)
    assert cached.shape[1] > 2
    assert torch.equal(cached, full)


def test_unknown_model_key_is_rejected_with_its_name():
    with pytest.raises(ConfigError, match="fusion_strid"):
        load_model_config("tiny", ["fusion_strid=3"])


@pytest.mark.parametrize("name,target,tolerance", [
    ("mplug.en.base", 350e6, 0.07), ("mplug.en.large", 600e6, 0.07), ("mplug.en.large.v2", 600e6, 0.07),
    ("mplug.en.huge", 1.1e9, 0.12)])
def test_parameter_totals_are_within_tolerance_of_published_sizes(name, target, tolerance):
    report = parameter_report(load_model_config(name))  # built on the meta device: no weights allocated
    assert abs(report["total"] - target) <= tolerance * target, report["total"]
    assert report["total"] == sum(report["modules"].values())
    assert report["momentum_teacher"] > 0


@pytest.mark.slow
def test_model_info_prints_the_report_as_json():
    out = run_checked([sys.executable, ROOT / "tools" / "model_info.py", "--model", "mplug.en.base", "--json"], 120)
    assert json.loads(out) == parameter_report(load_model_config("mplug.en.base"))


def test_public_factory_lists_and_builds_the_named_models():
    import mplug_ds

    names = mplug_ds.list_models()
    assert {"tiny", "mplug.en.base", "mplug.en.large", "mplug.en.huge"} <= set(names)
    model = mplug_ds.create_model("tiny", attn_backend="eager", vision={"image_size": 32})
    assert model.cfg.name == "tiny" and model.cfg.attn_backend == "eager" and model.cfg.vision.image_size == 32
    assert model.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 1 + 4, model.cfg.text.hidden_size)
    with pytest.raises(ConfigError, match="mplug.en.base"):
        mplug_ds.create_model("mplug.en.bas")  # the error lists the known names
    with pytest.raises(ConfigError, match="attn_backnd"):
        mplug_ds.create_model("tiny", attn_backnd="eager")
