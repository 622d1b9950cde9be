"""Consolidate a DeepSpeed training checkpoint (any ZeRO stage) into plain safetensors + the model config.

Output directory::

    model.safetensors           the online MPLUG weights in fp32, keys exactly as ``build_model(cfg).state_dict()``;
                                metadata: source, step, ``task`` (the fine-tuning's task, ``pretrain`` for a
                                pre-training) and ``random_init`` (tensors the run never trained, when it records any)
    task.safetensors            a fine-tuning's own tensors beside the MPLUG (a classification head: ``head.*``),
                                with the task's name in its metadata (only when the checkpoint has such tensors)
    momentum.safetensors        the EMA teacher (only with ``include_momentum``)
    model_config.yaml           the ModelConfig the weights belong to (``load_model_config(path)`` reads it)
    run_config.yaml             the run's config.yaml (task options, text lengths: what ``mplug_ds.load`` predicts with)

Runs in a single process, without GPUs or a process group (DeepSpeed's ``zero_to_fp32`` reader).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file, save_file

from mplug_ds.config import to_dict
from mplug_ds.engine.checkpoint import (COMPLETE, EXPORT_FILE, RANDOM_INIT_FILE, RUN_CONFIG_FILE, TASK_FILE,
                                        TEACHER_FILE, resolve_resume, shard_files)
from mplug_ds.models.config import ModelConfig, load_model_config
from mplug_ds.models.hub import random_init_metadata
from mplug_ds.models.mplug import build_model
from mplug_ds.runtime import safe_load
from mplug_ds.runtime.atomic import atomic_path, atomic_write_text
from mplug_ds.runtime.partitioned_ema import consolidate_shards

MODEL_PREFIX = "model."  # PretrainModel and the task modules keep the online MPLUG as ``.model``
STAGE0_MODEL_FILE = "mp_rank_00_model_states.pt"


def run_file(tag_dir: Path, name: str) -> Path | None:
    """The file ``name`` (``model_config.yaml``, ``config.yaml``) saved by the run that wrote ``tag_dir``."""
    for parent in (tag_dir.parent.parent, tag_dir.parent, tag_dir):
        if (parent / name).is_file():
            return parent / name
    return None


def find_run_model_config(tag_dir: Path) -> Path:
    """The ``model_config.yaml`` saved by the training run that wrote ``tag_dir``."""
    found = run_file(tag_dir, "model_config.yaml")
    if found is None:
        raise FileNotFoundError(f"no model_config.yaml found next to {tag_dir}; pass the model config explicitly")
    return found


def read_module_state(tag_dir: Path, trusted: bool = False) -> dict[str, torch.Tensor]:
    """The trained module's full fp32 state dict (``model.…`` and any task tensors) from a checkpoint of any ZeRO
    stage. Its files are read with the restricted unpickler unless ``trusted`` (see ``safe_load``)."""
    if not trusted:
        safe_load.check_checkpoint(tag_dir)
    if any(tag_dir.glob("*optim_states.pt")):  # ZeRO-1/2/3 (and bf16): the fp32 master weights live there
        with safe_load.deepspeed_weights_only(trusted):
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return safe_load.load(tag_dir / STAGE0_MODEL_FILE, trusted)["module"]  # stage 0 in fp32: the module's own


def consolidate(tag_dir: Path, model_cfg: ModelConfig, trusted: bool = False) -> dict[str, torch.Tensor]:
    """The online model's full fp32 state dict from a checkpoint, checked against a freshly built model."""
    return _online_model(read_module_state(tag_dir, trusted), model_cfg, tag_dir)


def _online_model(merged: dict[str, torch.Tensor], model_cfg: ModelConfig, tag_dir: Path) -> dict[str, torch.Tensor]:
    online = {k[len(MODEL_PREFIX):]: v for k, v in merged.items() if k.startswith(MODEL_PREFIX)}
    reference = build_model(model_cfg).state_dict()
    missing = sorted(set(reference) - set(online))
    unexpected = sorted(set(online) - set(reference))
    if missing or unexpected:
        raise RuntimeError(f"{tag_dir}: checkpoint does not match model '{model_cfg.name}': "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, ref in reference.items():
        if online[key].shape != ref.shape:
            raise RuntimeError(f"{tag_dir}: '{key}' has shape {tuple(online[key].shape)}, model '{model_cfg.name}' "
                               f"expects {tuple(ref.shape)}")
    return _owned(online)


def _owned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Tied weights arrive as one shared tensor; safetensors needs every entry to own its storage.
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def run_task_name(tag_dir: Path) -> str | None:
    """``task.name`` of the fine-tuning that wrote ``tag_dir``, ``pretrain`` for a pre-training (its saved
    ``config.yaml`` has no task), ``None`` when no ``config.yaml`` is found."""
    config = run_file(tag_dir, "config.yaml")
    if config is None:
        return None
    task = (yaml.safe_load(config.read_text()) or {}).get("task") or {}
    return str(task["name"]) if task.get("name") else "pretrain"


def run_random_init(tag_dir: Path) -> list[str]:
    """The tensors the run that wrote ``tag_dir`` never trained (its ``random_init.yaml``; ``[]`` without one)."""
    found = run_file(tag_dir, RANDOM_INIT_FILE)
    return list((yaml.safe_load(found.read_text()) or {}).get("keys") or []) if found else []


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, model_config: str | None = None,
                      include_momentum: bool = False, trusted: bool = False) -> Path:
    """Write ``model.safetensors`` (+ ``task.safetensors`` for a task head, + optional ``momentum.safetensors``)
    and ``model_config.yaml`` to ``out_dir``.

    ``checkpoint``: a ``step_*`` tag directory, a checkpoints directory or a run directory (newest complete
    checkpoint). ``model_config``: a model name or YAML path; default: the run's saved ``model_config.yaml``.
    ``trusted``: allow files that need full unpickling (can run code); otherwise such a file is refused.
    """
    tag_dir = resolve_resume(str(checkpoint), Path(checkpoint))
    if tag_dir is None:
        raise FileNotFoundError(f"{checkpoint}: no complete checkpoint")
    cfg_path = model_config or find_run_model_config(tag_dir)
    model_cfg = load_model_config(cfg_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    marker = json.loads((tag_dir / COMPLETE).read_text())
    metadata = {"source": str(tag_dir), "step": str(marker["step"]), "format": "mplug_ds"}
    task = run_task_name(tag_dir)
    if task is not None:
        metadata["task"] = task
    merged = read_module_state(tag_dir, trusted)
    _atomic_save(_online_model(merged, model_cfg, tag_dir), out / EXPORT_FILE,
                 {**metadata, **random_init_metadata(run_random_init(tag_dir))})
    task_state = {k: v for k, v in merged.items() if not k.startswith(MODEL_PREFIX)}
    if task_state:
        if task in (None, "pretrain"):
            raise FileNotFoundError(f"{tag_dir} holds task tensors but no config.yaml with task.name was found "
                                    "next to it")
        _atomic_save(_owned(task_state), out / TASK_FILE, metadata)
    else:  # an earlier export into this directory must not lend its head to this model
        (out / TASK_FILE).unlink(missing_ok=True)
    run_config = run_file(tag_dir, "config.yaml")
    if run_config is not None:
        atomic_write_text(out / RUN_CONFIG_FILE, run_config.read_text())
    else:  # nor its settings
        (out / RUN_CONFIG_FILE).unlink(missing_ok=True)
    if include_momentum:
        teacher = read_teacher(tag_dir, trusted)
        _atomic_save({k: v.float().contiguous().clone() for k, v in teacher.items()},
                     out / "momentum.safetensors", metadata)
    text = yaml.safe_dump(to_dict(model_cfg), sort_keys=False)
    atomic_write_text(out / "model_config.yaml", text)
    return out


def read_teacher(tag_dir: Path, trusted: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's momentum teacher as full fp32 tensors by name: the replicated file, or the partitioned
    teacher's shards of every rank put together."""
    shards = shard_files(tag_dir)
    if shards:  # our own files: always read with the restricted unpickler
        return consolidate_shards(shards)
    teacher_file = tag_dir / TEACHER_FILE
    if not teacher_file.exists():
        raise FileNotFoundError(f"{tag_dir} has no momentum teacher (objective.distill was off)")
    return safe_load.load(teacher_file, trusted)


def load_weights(model: torch.nn.Module, export_dir: str | Path) -> None:
    """Load ``model.safetensors`` of an export directory into ``model`` (strict: keys and shapes must match)."""
    path = Path(export_dir).expanduser() / EXPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (model.init_from must be a tools/export_checkpoint.py output)")
    model.load_state_dict(load_file(str(path)), strict=True)


def load_exported(out_dir: str | Path) -> torch.nn.Module:
    """Build the plain (non-DeepSpeed) model from an export directory and load its weights (strict)."""
    out = Path(out_dir)
    model = build_model(load_model_config(out / "model_config.yaml"))
    load_weights(model, out)
    return model


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
