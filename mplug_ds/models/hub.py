"""Hugging Face-style model directories: ``config.json`` (the ModelConfig) + ``model.safetensors`` (fp32 weights).

The same directory also holds ``model_config.yaml``, so it is an export directory that pre-training's
``model.init_from`` and ``mplug_ds.engine.export.load_exported`` read. Round trips are bit-exact: tensors are
written as they are (no dtype change) and read back with safetensors.

``model.safetensors``' metadata may list the tensors that were never trained (``random_init``: a converted release
lacks some heads, which keep their random initialisation); ``random_init_keys`` reads it, so that every loader can
warn about, or refuse, a task that needs them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mplug_ds.config import from_dict, to_dict
from mplug_ds.models.config import ModelConfig
from mplug_ds.models.mplug import MPLUG
from mplug_ds.runtime.atomic import atomic_path, atomic_write_text

MODEL_TYPE = "mplug_ds"
WEIGHTS_FILE = "model.safetensors"
RANDOM_INIT = "random_init"  # metadata key of model.safetensors: JSON list of the tensors never trained


def random_init_metadata(keys: list[str]) -> dict[str, str]:
    """The metadata entry recording ``keys`` as left at random initialisation (empty when there are none)."""
    return {RANDOM_INIT: json.dumps(sorted(keys))} if keys else {}


def random_init_keys(directory: str | Path) -> list[str]:
    """The tensors ``directory``'s ``model.safetensors`` records as never trained (``[]`` when it records none)."""
    path = Path(directory) / WEIGHTS_FILE
    with safe_open(str(path), "pt") as f:
        value = (f.metadata() or {}).get(RANDOM_INIT)
    return list(json.loads(value)) if value else []


def save_state(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path,
               metadata: dict[str, str] | None = None, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write ``state`` (keys of ``MPLUG(cfg).state_dict()``) and ``cfg`` to ``out_dir``; ``extra`` adds more
    safetensors files by stem (e.g. ``{"momentum": teacher_state}``). Every file is written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": MODEL_TYPE, **(metadata or {})}
    for stem, tensors in {"model": state, **(extra or {})}.items():
        # Tied weights share storage; safetensors needs every entry to own its memory (others are not copied).
        owned, seen = {}, set()
        for key, value in tensors.items():
            value = value.detach().contiguous()
            ptr = value.untyped_storage().data_ptr()
            owned[key] = value.clone() if ptr in seen else value
            seen.add(ptr)
        with atomic_path(out / f"{stem}.safetensors") as tmp:
            save_file(owned, str(tmp), metadata=meta)
    config = {"model_type": MODEL_TYPE, "architectures": ["MPLUG"], **to_dict(cfg)}
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(out / "model_config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out


def save_pretrained(model: MPLUG, out_dir: str | Path) -> Path:
    """Export a model to a Hugging Face-style directory."""
    return save_state(model.state_dict(), model.cfg, out_dir)


def read_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of a directory written by ``save_state`` (``config.json``)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass a directory written by save_pretrained or "
                                "tools/convert_checkpoint.py")
    raw = json.loads(path.read_text())
    if raw.pop("model_type", None) != MODEL_TYPE:
        raise ValueError(f"{path}: model_type is not '{MODEL_TYPE}'")
    raw.pop("architectures", None)
    return from_dict(ModelConfig, raw, str(path))


def from_pretrained(directory: str | Path) -> MPLUG:
    """Build the model from ``config.json`` and load ``model.safetensors`` strictly (keys and shapes).

    The model is built on the meta device and takes the loaded tensors (one copy of the weights in memory);
    the decoder's LM head is tied back to its word embeddings.
    """
    with torch.device("meta"):
        model = MPLUG(read_config(directory))
    state = load_file(str(Path(directory) / "model.safetensors"))
    alias, embeddings = "decoder.cls.predictions.decoder.weight", "decoder.bert.embeddings.word_embeddings.weight"
    if not torch.equal(state[alias], state[embeddings]):
        raise ValueError(f"{directory}: '{alias}' differs from the word embeddings it is tied to")
    model.load_state_dict(state, strict=True, assign=True)
    model.decoder.cls.predictions.decoder.weight = model.decoder.bert.embeddings.word_embeddings.weight
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{directory}: tensors not restored: {left[:5]}")
    return model
