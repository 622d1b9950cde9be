"""The pre-training run configuration (``mplug_ds/configs/pretrain/*.yaml``) and its validation.

One dataclass tree: the engine sections (``EngineConfig``) plus model, objective, data, eval and TiMix. Built once
per run (YAML + ``key=value`` overrides), checked completely by ``validate`` before any process starts work, and
saved beside the run's outputs as ``config.yaml``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from mplug_ds.config import ConfigError, load_config
from mplug_ds.data.data_config import check_full_batches
from mplug_ds.data.pipeline import check_config, check_shard_files
from mplug_ds.data.region_streams import region_pipeline_config
from mplug_ds.data.streams import DataSection, pipeline_config
from mplug_ds.engine.train_config import EngineConfig, ModelSection
from mplug_ds.engine.validate import ResolvedEngine, validate_engine
from mplug_ds.models.config import ModelConfig, load_model_config
from mplug_ds.objectives.pretrain import PretrainConfig
from mplug_ds.objectives.timix import TimixConfig
from mplug_ds.objectives.timix_mixing import side_range


@dataclass
class EvalSection:
    """End-of-run zero-shot retrieval on a held-out split (demo: its test split)."""

    retrieval: bool = True  # run zero-shot image-text retrieval after the last step
    max_samples: int = 256  # held-out images used (with all their captions)
    batch_size: int = 32  # images or captions encoded at once


@dataclass
class TrainConfig(EngineConfig):
    """Everything one pre-training run needs: the engine sections plus model, objective, data and eval."""

    model: ModelSection = field(default_factory=ModelSection)
    objective: PretrainConfig = field(default_factory=PretrainConfig)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    timix: TimixConfig = field(default_factory=TimixConfig)  # TiMix pre-training (off by default)


def load_train_config(name_or_path: str | Path = "demo", overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a pre-training config by name (``demo``, ``base``, ``large``) or YAML path, with overrides."""
    return load_config(TrainConfig, "pretrain", name_or_path, overrides)


@dataclass
class ResolvedRun(ResolvedEngine):
    """A validated pre-training run: the engine's part plus the model and objective configs."""

    model: ModelConfig
    objective: PretrainConfig


def validate(cfg: TrainConfig, world_size: int) -> ResolvedRun:
    """Validate a pre-training config completely (engine sections, data, model, objective)."""
    engine = validate_engine(cfg, world_size)
    d = cfg.data
    if d.source == "shards" and not d.pipeline.sources:
        raise ConfigError("data.pipeline.sources is required when data.source=shards, e.g. "
                          "[{name: cc3m, shards: '/data/cc3m/{000000..000331}.tar', manifest: /data/cc3m/manifest.json}]")
    for key, value in (("eval.batch_size", cfg.eval.batch_size), ("eval.max_samples", cfg.eval.max_samples)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if d.pipeline.num_workers < 0:
        raise ConfigError(f"data.pipeline.num_workers must be >= 0 (0 reads in the training process), "
                          f"got {d.pipeline.num_workers}")
    try:
        check_full_batches(d.pipeline, "data.pipeline")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if d.eval_shards:
        try:
            check_shard_files(d.eval_shards, "data.eval_shards")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if d.max_text_len < 4:
        raise ConfigError(f"data.max_text_len must be >= 4, got {d.max_text_len}")
    if cfg.model.init_vision_from and not Path(cfg.model.init_vision_from).expanduser().is_file():
        raise ConfigError(f"model.init_vision_from: {cfg.model.init_vision_from} is not a file (pass an OpenAI-CLIP "
                          "or open_clip state-dict file)")
    if cfg.model.init_text_from and not (Path(cfg.model.init_text_from).expanduser() / "config.json").is_file():
        raise ConfigError(f"model.init_text_from: {cfg.model.init_text_from} has no config.json (pass a Hugging "
                          "Face BERT model directory)")
    if cfg.model.init_from and not (Path(cfg.model.init_from).expanduser() / "model.safetensors").is_file():
        raise ConfigError(f"model.init_from: {cfg.model.init_from} has no model.safetensors "
                          "(give a directory written by tools/export_checkpoint.py)")
    try:
        model = load_model_config(cfg.model.name, cfg.model.override_list())
    except ConfigError as err:
        raise ConfigError(f"model: {err}") from None
    if d.source == "shards":
        try:
            check_config(pipeline_config(cfg.data, cfg.batch.micro_batch_per_gpu, model.vision.image_size,
                                         model.vision.patch_size), where="data.pipeline")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    o = cfg.objective
    if not 0 <= o.alpha <= 1 or not 0 <= o.momentum < 1 or not 0 < o.mlm_probability < 1:
        raise ConfigError(f"objective: alpha must be in [0, 1] (got {o.alpha}), momentum in [0, 1) (got {o.momentum}) "
                          f"and mlm_probability in (0, 1) (got {o.mlm_probability})")
    model = resolve_timix(cfg, model)
    return ResolvedRun(ds_config=engine.ds_config, report_to=engine.report_to, model=model, objective=o)


def resolve_timix(cfg: TrainConfig, model: ModelConfig) -> ModelConfig:
    """Check the ``timix`` section; with TiMix on, the model config gains its patch predictor's block."""
    t = cfg.timix
    if not t.enabled:
        return model
    layer = t.layer_for(model.vision.layers)
    if not 0 <= layer < model.vision.layers:
        raise ConfigError(f"timix.predictor_layer={layer} is outside the ViT's blocks 0..{model.vision.layers - 1}")
    if model.patch_predictor_layer not in (None, layer):
        raise ConfigError(f"model patch_predictor_layer={model.patch_predictor_layer} disagrees with "
                          f"timix.predictor_layer ({layer}); set only timix.predictor_layer")
    try:
        side_range(model.vision.image_size // model.vision.patch_size, t.min_side_ratio, t.max_side_ratio)
    except ValueError as err:
        raise ConfigError(f"timix: {err}") from None
    if t.step_order == "reference_three_steps" and cfg.batch.grad_accum_steps != 1:
        raise ConfigError("timix.step_order=reference_three_steps takes three optimizer steps per batch and needs "
                          f"batch.grad_accum_steps=1 (got {cfg.batch.grad_accum_steps})")
    if cfg.data.source == "shards":
        if not t.regions.sources:
            raise ConfigError("timix.regions.sources is required with data.source=shards: region shards (make_shards "
                              "vg-regions / vg-objects / refcoco / xvlm-regions), e.g. "
                              "[{name: vg, shards: '/data/vg_regions/{000000..000107}.tar'}]")
        try:
            check_config(region_pipeline_config(t.regions, t.region_images_per_gpu, model.vision.image_size,
                                                model.vision.patch_size, cfg.data.max_text_len), where="timix.regions")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return dataclasses.replace(model, patch_predictor_layer=layer)
