"""``--pretrained``: start a task from an exported pre-training checkpoint or a DeepSpeed checkpoint directory.

Accepted paths:
  * an export directory (``tools/export_checkpoint.py``): ``model.safetensors`` (+ ``model_config.yaml``; an export of
    a fine-tuning with a head also has ``task.safetensors``);
  * a DeepSpeed run directory, its ``checkpoints/`` directory or one ``step_*`` tag (newest complete one), from
    pre-training or fine-tuning (the wrapped model is kept under ``model.`` in both).
The visual positional embedding is resized to the task resolution; every other tensor must match in shape.
``check_pretrained`` runs before any process starts work and reads only tensor shapes.

A checkpoint may record tensors that were never trained (a converted release lacks some heads; a fine-tuning from
it leaves the parts its task does not use as they were): ``untrained_parts`` names those a task uses, so that
fine-tuning warns and evaluation refuses (``check_trained``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mplug_ds.config import ConfigError
from mplug_ds.engine.checkpoint import EXPORT_FILE, TASK_FILE, resolve_resume
from mplug_ds.models import hub
from mplug_ds.models.config import ModelConfig
from mplug_ds.models.mplug import MPLUG, build_model
from mplug_ds.models.vision import resize_pos_embed

POS_EMBED = "visual.vit.pos_embed"
WRAPPER_PREFIX = "model."  # PretrainModel / task modules keep the MPLUG as ``.model``


@dataclass
class LoadReport:
    """What loading a pretrained checkpoint did."""

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # model keys the checkpoint lacks (left at their init)
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model does not have (ignored)
    resized: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.source}"]
        for name, keys in (("resized", self.resized), ("missing (kept at initialisation)", self.missing),
                           ("unexpected (ignored)", self.unexpected)):
            if keys:
                lines.append(f"  {name}: {len(keys)}: {', '.join(keys[:8])}{' …' if len(keys) > 8 else ''}")
        return "\n".join(lines)


def _deepspeed_tag(path: Path) -> Path | None:
    try:
        return resolve_resume(str(path), path)
    except FileNotFoundError:
        return None


def _fix(path: Path) -> str:
    return (f"--pretrained {path}: not an export directory (no {EXPORT_FILE}) nor a DeepSpeed checkpoint (no "
            "step_*/complete.json); pass the output of tools/export_checkpoint.py or a run/checkpoint directory")


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the model in a checkpoint, without loading the tensors of an export."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"--pretrained {path}: no such file or directory")
    if (path / EXPORT_FILE).is_file():
        try:
            with safe_open(str(path / EXPORT_FILE), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for damaged headers
            raise ConfigError(f"--pretrained {path / EXPORT_FILE}: unreadable ({err}); re-export the checkpoint") from None
    if _deepspeed_tag(path) is None:
        raise ConfigError(_fix(path))
    return {k: tuple(v.shape) for k, v in read_state(path).items()}


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's fp32 state dict from an export or a DeepSpeed checkpoint (any ZeRO stage)."""
    path = Path(path).expanduser()
    if (path / EXPORT_FILE).is_file():
        return load_file(str(path / EXPORT_FILE))
    merged = read_module_state(path)
    return {k[len(WRAPPER_PREFIX):]: v for k, v in merged.items() if k.startswith(WRAPPER_PREFIX)}


def read_module_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The trained module's fp32 state dict of a DeepSpeed checkpoint (any ZeRO stage), keys as in the module:
    ``model.…`` and the task's own tensors."""
    path = Path(path).expanduser()
    tag = _deepspeed_tag(path)
    if tag is None:
        raise FileNotFoundError(_fix(path))
    from mplug_ds.engine.export import read_module_state as read_checkpoint

    return read_checkpoint(tag)  # never unpickles code from a checkpoint


def _exported_task(path: Path) -> tuple[str | None, list[str]]:
    """The task name and tensor names of an export's ``task.safetensors`` (``None, []`` when it has none)."""
    if not (path / TASK_FILE).is_file():
        return None, []
    with safe_open(str(path / TASK_FILE), "pt") as f:
        return (f.metadata() or {}).get("task"), list(f.keys())


def _no_head(path: Path, task: str, prefixes: tuple[str, ...], lacking: str) -> str:
    return (f"--pretrained {path}: no {lacking}: evaluating task '{task}' needs its trained head "
            f"({', '.join(p + '*' for p in prefixes)}), which a DeepSpeed checkpoint of a '{task}' fine-tuning or its "
            f"export (tools/export_checkpoint.py writes the head to {TASK_FILE}) holds; pass one of those")


def check_task_weights(path: str | Path, task: str, prefixes: tuple[str, ...]) -> None:
    """Before any rank starts: an export to evaluate ``task`` with must hold that task's head (``prefixes``)."""
    path = Path(path).expanduser()
    if not prefixes or not (path / EXPORT_FILE).is_file():
        return
    exported, keys = _exported_task(path)
    if exported is None:
        raise ConfigError(_no_head(path, task, prefixes, f"{TASK_FILE} (an export of a pre-training)"))
    if exported != task:
        raise ConfigError(_no_head(path, task, prefixes, f"'{task}' head: its {TASK_FILE} is of task '{exported}'"))
    if not any(k.startswith(prefixes) for k in keys):
        raise ConfigError(_no_head(path, task, prefixes, f"head tensors in {path / TASK_FILE}"))


def load_task_weights(module: torch.nn.Module, path: str | Path, task: str, prefixes: tuple[str, ...]) -> int:
    """Load the task's own tensors (names starting with ``prefixes``) of a fine-tuning checkpoint or its export into
    ``module``; returns how many. ``ConfigError`` naming the first tensor the checkpoint lacks."""
    own = sorted(k for k in module.state_dict() if k.startswith(prefixes)) if prefixes else []
    if not own:
        return 0
    path = Path(path).expanduser()
    check_task_weights(path, task, prefixes)
    state = load_file(str(path / TASK_FILE)) if (path / EXPORT_FILE).is_file() else read_module_state(path)
    lacking = [k for k in own if k not in state]
    if lacking:
        raise ConfigError(_no_head(path, task, prefixes, f"'{lacking[0]}'"))
    module.load_state_dict({k: state[k] for k in own}, strict=False)
    return len(own)


def check_compatible(shapes: dict[str, tuple[int, ...]], model_cfg: ModelConfig, source: str) -> None:
    """Raise ``ConfigError`` unless the checkpoint fits ``model_cfg`` (positional embedding rows excepted)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(model_cfg).state_dict().items()}
    shared = set(shapes) & set(expected)
    if len(shared) < len(expected) // 2:
        raise ConfigError(f"--pretrained {source}: only {len(shared)} of the {len(expected)} tensors of model "
                          f"'{model_cfg.name}' are in the checkpoint (e.g. it lacks {sorted(set(expected) - shared)[:3]}); "
                          "pass an mplug_ds checkpoint of this model")
    for key in sorted(shared):
        if key == POS_EMBED and shapes[key][-1] == expected[key][-1]:
            continue
        if shapes[key] != expected[key]:
            raise ConfigError(f"--pretrained {source}: '{key}' has shape {list(shapes[key])} but model "
                              f"'{model_cfg.name}' expects {list(expected[key])}; set model.name to the model the "
                              "checkpoint was trained with (its model_config.yaml) or pass a matching checkpoint")


def check_pretrained(path: str | Path, model_cfg: ModelConfig) -> None:
    """Everything about ``--pretrained`` that can fail, checked before training starts."""
    check_compatible(checkpoint_shapes(path), model_cfg, str(path))


def load_pretrained(model: MPLUG, path: str | Path) -> LoadReport:
    """Load a checkpoint into ``model`` (positional embedding resized); returns the load report."""
    state = read_state(path)
    report = LoadReport(source=str(path))
    target = model.state_dict()
    pos = state.get(POS_EMBED)
    if pos is not None and pos.shape != target[POS_EMBED].shape:
        grid = model.cfg.vision.image_size // model.cfg.vision.patch_size
        state[POS_EMBED] = resize_pos_embed(pos, grid)
        report.resized.append(f"{POS_EMBED} {list(pos.shape)} → {list(state[POS_EMBED].shape)}")
    check_compatible({k: tuple(v.shape) for k, v in state.items()}, model.cfg, str(path))
    result = model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    report.missing = sorted(result.missing_keys)
    report.unexpected = sorted(set(state) - set(target))
    report.loaded = len(set(state) & set(target))
    return report


def random_init_keys(path: str | Path) -> list[str]:
    """The tensors a checkpoint records as never trained: an export's (or converted directory's)
    ``model.safetensors`` metadata, a DeepSpeed run's ``random_init.yaml``; ``[]`` when it records none."""
    path = Path(path).expanduser()
    if (path / EXPORT_FILE).is_file():
        return hub.random_init_keys(path)
    tag = _deepspeed_tag(path)
    if tag is None:
        return []
    from mplug_ds.engine.export import run_random_init

    return run_random_init(tag)


def untrained_parts(keys: list[str], uses: tuple[str, ...]) -> dict[str, int]:
    """Of the never-trained ``keys``, those under the ``uses`` prefixes: tensor count per part of the model."""
    return dict(sorted(Counter(k.split(".")[0] for k in keys if k.startswith(uses)).items()))


def describe_untrained(path: str | Path, task: str, parts: dict[str, int]) -> str:
    """One sentence naming what of ``path`` that ``task`` needs was never trained."""
    listed = ", ".join(f"{name} ({n} tensor{'s' if n > 1 else ''})" for name, n in parts.items())
    return (f"{path} left at random initialisation what task '{task}' uses: {listed} (the checkpoint it came "
            "from did not contain them; see tools/convert_checkpoint.py's report)")


def check_trained(path: str | Path, task: str, uses: tuple[str, ...]) -> None:
    """Before any rank evaluates: ``ConfigError`` when ``path`` records a part ``task`` uses as never trained."""
    parts = untrained_parts(random_init_keys(path), uses)
    if parts:
        raise ConfigError(f"--pretrained {describe_untrained(path, task, parts)}; evaluating it would only give "
                          f"meaningless numbers: fine-tune '{task}' from it first, or pass a checkpoint that holds "
                          "them")
