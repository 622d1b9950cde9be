"""DeepSpeed config building: templates are filled from our config and never disagree with it."""
import json

import pytest

from mplug_ds.config import ConfigError
from mplug_ds.engine.ds_config import DS_CONFIG_DIR, build_ds_config, offloads_optimizer, zero_stage
from mplug_ds.objectives.pretrain_config import load_train_config

TEMPLATES = ["zero1", "zero2", "zero3", "zero3_offload"]


def _cfg(*overrides):
    return load_train_config("synthetic_tiny", list(overrides))


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_are_readable_json_with_auto_batch_fields(name):
    raw = json.loads((DS_CONFIG_DIR / f"{name}.json").read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert raw[key] == "auto", f"{name}.json must leave {key} to the training config"


@pytest.mark.parametrize("name,stage", [("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_batch_geometry_and_clipping_are_filled_consistently(name, stage):
    cfg = _cfg(f"deepspeed.config={name}", "batch.micro_batch_per_gpu=6", "batch.grad_accum_steps=3",
               "optim.grad_clip=0.5")
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 6
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 6 * 3 * 4
    assert ds["gradient_clipping"] == 0.5
    assert zero_stage(ds) == stage
    assert offloads_optimizer(ds) == (name == "zero3_offload")
    assert "auto" not in json.dumps(ds)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_precision_blocks(precision):
    ds = build_ds_config(_cfg(f"deepspeed.precision={precision}"), world_size=1)
    assert ds.get("bf16", {}).get("enabled", False) == (precision == "bf16")
    assert ds.get("fp16", {}).get("enabled", False) == (precision == "fp16")
    if precision == "fp16":
        assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def _write(tmp_path, data):
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_explicit_batch_value_that_disagrees_names_the_key(tmp_path):
    path = _write(tmp_path, {"train_batch_size": 491520000000, "zero_optimization": {"stage": 2}})
    with pytest.raises(ConfigError, match="train_batch_size"):
        build_ds_config(_cfg(f"deepspeed.config={path}"), world_size=2)


def test_conflicting_precision_flag_names_the_key(tmp_path):
    path = _write(tmp_path, {"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}})
    with pytest.raises(ConfigError, match=r"fp16\.enabled"):
        build_ds_config(_cfg(f"deepspeed.config={path}", "deepspeed.precision=bf16"), world_size=1)


def test_misspelt_deepspeed_key_is_rejected(tmp_path):
    path = _write(tmp_path, {"zero_optimisation": {"stage": 2}})
    with pytest.raises(ConfigError, match="zero_optimisation"):
        build_ds_config(_cfg(f"deepspeed.config={path}"), world_size=1)


def test_scheduler_in_template_is_rejected(tmp_path):
    path = _write(tmp_path, {"scheduler": {"type": "WarmupLR"}})
    with pytest.raises(ConfigError, match="scheduler"):
        build_ds_config(_cfg(f"deepspeed.config={path}"), world_size=1)


def test_unknown_template_name_lists_the_built_in_ones():
    with pytest.raises(ConfigError, match="zero3_offload"):
        build_ds_config(_cfg("deepspeed.config=zero4"), world_size=1)
