"""The fine-tuning run configuration: the engine sections every run shares plus model, task, data and eval.

Loaded from ``mplug_ds/configs/tasks/*.yaml`` (``grounding_demo``, ``grounding_large``, ``retrieval_large`` …) with
``key=value`` overrides, validated before any process starts work, and saved beside the run as ``config.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from mplug_ds.config import load_config
from mplug_ds.data.data_config import DataConfig
from mplug_ds.engine.train_config import EngineConfig, ModelSection


@dataclass
class TaskSection:
    """Which task, its options, and the weights it starts from."""

    name: str = ""  # the task, one of TASKS (launch/finetune.py --task sets it)
    options: dict[str, Any] = field(default_factory=dict)  # fields of the task's config (GroundingConfig, …)
    pretrained: str | None = None  # export dir or DeepSpeed checkpoint dir; demo: the demo pre-training checkpoint
    demo_pretrain: list[str] = field(default_factory=list)  # overrides of the demo pre-training made when missing


@dataclass
class TaskDataSection:
    """Training shards (``pipeline.sources``) and evaluation shards, or the demo world's task data."""

    source: Literal["demo", "shards"] = "demo"  # demo: generated into cache_dir on first use
    max_text_len: int = 30  # text tokens including [CLS] and [SEP]
    pipeline: DataConfig = field(default_factory=DataConfig)  # sources, workers, shuffling, augmentation
    eval_shards: str | None = None  # evaluation shards (source=shards); every sample evaluated once
    cache_dir: str = "~/.cache/mplug_ds/demo"  # demo data and the demo pre-training checkpoint


@dataclass
class TaskEvalSection:
    """Evaluation during and after fine-tuning; the task's metric selects the best checkpoint."""

    every_steps: int = 0  # also evaluate every this many optimizer steps (0: only after the last step)
    at_start: bool = False  # also evaluate before the first step (the zero-shot figure beside the fine-tuned one)
    max_samples: int | None = None  # evaluate only the first N samples of the evaluation shards (None: all)
    batch_size: int = 64


@dataclass
class FinetuneConfig(EngineConfig):
    """Everything one fine-tuning run needs."""

    model: ModelSection = field(default_factory=ModelSection)
    task: TaskSection = field(default_factory=TaskSection)
    data: TaskDataSection = field(default_factory=TaskDataSection)
    eval: TaskEvalSection = field(default_factory=TaskEvalSection)


def load_finetune_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """Load a task config by name (``grounding_demo``, ``retrieval_large`` …) or YAML path, with overrides."""
    return load_config(FinetuneConfig, "tasks", name_or_path, overrides)
