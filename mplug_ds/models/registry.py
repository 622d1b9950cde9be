"""The public model factory: ``create_model(name)`` and ``list_models()`` over the named sizes in configs/models."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mplug_ds.config import available_configs, deep_merge, from_dict, to_dict
from mplug_ds.models.config import ModelConfig, load_model_config
from mplug_ds.models.mplug import MPLUG


def list_models() -> list[str]:
    """Names ``create_model`` accepts (``mplug.en.base``, ``mplug.en.large``, ``tiny`` …)."""
    return available_configs("models")


def create_model(name: str | Path, **overrides: Any) -> MPLUG:
    """A freshly initialised mPLUG by name (see ``list_models()``) or model YAML path.

    Keyword arguments override config fields; nested sections take dicts, e.g.
    ``create_model("mplug.en.base", attn_backend="eager", vision={"image_size": 384})``. Pretrained weights are
    loaded separately (``mplug_ds.models.weights``, or ``mplug_ds.engine.export.load_exported`` for our exports).
    """
    cfg = load_model_config(name)
    if overrides:
        cfg = from_dict(ModelConfig, deep_merge(to_dict(cfg), overrides), where=f"create_model({str(name)!r})")
    return MPLUG(cfg)
