"""A fine-tuning task as a ``Recipe`` of the one ``Trainer``: the task's module (from pre-trained weights), its
training stream, step arguments, periodic exact evaluation with a results file, and its extra checkpoint state."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mplug_ds.config import to_dict
from mplug_ds.data.data_config import DataConfig, SourceConfig
from mplug_ds.data.demo_tasks import prepare_demo_task_shards
from mplug_ds.data.pipeline import ShardLoader
from mplug_ds.data.streams import EndlessShardBatches
from mplug_ds.distributed import get_rank
from mplug_ds.engine.checkpoint import RANDOM_INIT_FILE
from mplug_ds.engine.recipe import Recipe, TrainStream
from mplug_ds.engine.validate import ResolvedEngine
from mplug_ds.models.config import ModelConfig
from mplug_ds.models.mplug import build_model
from mplug_ds.runtime.launch_env import WorldInfo
from mplug_ds.tasks.base import EvalResult, FinetuneTask
from mplug_ds.tasks.evaluation import run_evaluation
from mplug_ds.tasks.finetune_config import FinetuneConfig
from mplug_ds.tasks.pretrained import describe_untrained, load_pretrained, random_init_keys, untrained_parts

log = logging.getLogger("mplug_ds.train")


@dataclass
class ResolvedTask(ResolvedEngine):
    """A validated fine-tuning run: the engine's part plus the model config, the task and its shards."""

    model: ModelConfig
    task: FinetuneTask
    train_sources: list[SourceConfig]
    eval_shards: str | None


def task_data_config(cfg: FinetuneConfig, model: ModelConfig, task: FinetuneTask, train: bool,
                     sources: list[SourceConfig]) -> DataConfig:
    """The task's stream config: ``data.pipeline`` plus the task's preparation at this model's geometry."""
    return dataclasses.replace(cfg.data.pipeline, sources=sources, task=task.sample_task, train=train,
                               batch_size=cfg.batch.micro_batch_per_gpu, image_res=model.vision.image_size,
                               patch_size=model.vision.patch_size, max_len=cfg.data.max_text_len)


def resolve_task_shards(cfg: FinetuneConfig, task: FinetuneTask) -> tuple[list[SourceConfig], str | None]:
    """Training sources and evaluation shards: the demo's task data (prepared on first use) or the config's."""
    if cfg.data.source == "demo":
        shards = prepare_demo_task_shards(Path(cfg.data.cache_dir), task.name)
        return [SourceConfig(f"demo-{task.name}", shards.train, manifest=shards.train_manifest)], shards.eval
    return list(cfg.data.pipeline.sources), cfg.data.eval_shards


class TaskRecipe(Recipe):
    """The engine's view of one fine-tuning task."""

    def __init__(self, cfg: FinetuneConfig, resolved: ResolvedTask, world: WorldInfo) -> None:
        self.cfg, self.resolved, self.world, self.task = cfg, resolved, world, resolved.task
        model = build_model(resolved.model)
        self.random_init: list[str] = []  # tensors of the start checkpoint never trained that this run leaves so
        if cfg.task.pretrained:
            report = load_pretrained(model, cfg.task.pretrained)
            never_trained = random_init_keys(cfg.task.pretrained)
            self.random_init = [k for k in never_trained if not k.startswith(self.task.uses)]
            parts = untrained_parts(never_trained, self.task.uses)
            if world.rank == 0:
                log.info(report.format())
                if parts:
                    log.warning("--pretrained %s; fine-tuning trains them from there",
                                describe_untrained(cfg.task.pretrained, self.task.name, parts))
        self.module = self.task.build(model)
        self.loss_keys = self.task.loss_keys
        self.metric = self.task.metric
        self.eval_every_steps = cfg.eval.every_steps if resolved.eval_shards else 0
        self.evaluate_at_start = cfg.eval.at_start and resolved.eval_shards is not None
        self.teacher = getattr(self.module, "teacher", None)
        self.engine: Any = None
        self.start_eval: EvalResult | None = None  # the evaluation before the first step (eval.at_start)
        self.last_eval: EvalResult | None = None

    def train_stream(self) -> TrainStream:
        data = task_data_config(self.cfg, self.resolved.model, self.task, True, self.resolved.train_sources)
        return EndlessShardBatches(ShardLoader(data, self.world.rank, self.world.world_size))

    def step_args(self, step: int) -> dict[str, float]:
        """The distillation weight ramp for tasks with a momentum teacher (``schedule.alpha_warmup_steps``)."""
        alpha = getattr(self.task.cfg, "alpha", None)
        if alpha is None:
            return {}
        ramp = self.cfg.schedule.alpha_warmup_steps
        return {"alpha": alpha if ramp == 0 else alpha * min(1.0, step / ramp)}

    def param_group_key(self, param: Any) -> str:
        return self.teacher.group_key(param) if self.teacher is not None else ""

    def engine_ready(self, engine: Any) -> None:
        self.engine = engine
        if self.teacher is not None:
            self.teacher.attach(engine)
        queue = getattr(self.module, "queue", None)
        if queue is not None:
            queue.to(engine.device)

    def after_optimizer_step(self) -> None:
        if self.teacher is not None:
            self.teacher.update()

    def evaluate(self, engine: Any) -> dict[str, float]:
        """Evaluate every sample of the evaluation shards once; rank 0 writes ``eval/step_XXXXXXXX.json``."""
        if self.resolved.eval_shards is None:
            return {}
        step = int(engine.global_steps)
        data = task_data_config(self.cfg, self.resolved.model, self.task, False, self.resolved.train_sources)
        path = self.cfg.output_dir / "eval" / f"step_{step:08d}.json" if get_rank() == 0 else None
        result = run_evaluation(self.task, engine.module, self.resolved.eval_shards, data, self.cfg.eval.batch_size,
                                self.cfg.eval.max_samples, engine.device, path)
        self.last_eval = result
        if step == 0:
            self.start_eval = result
        return {**result.metrics, **{f"baseline/{k}": v for k, v in result.baseline.items()}}

    def extra_state(self) -> dict[str, Any] | None:
        state: dict[str, Any] = {}
        teacher = self.teacher.state_dict() if self.teacher is not None else None  # None when partitioned
        if teacher is not None:
            state |= {f"teacher.{k}": v for k, v in teacher.items()}
        if hasattr(self.module, "extra_state"):
            state |= {f"module.{k}": v for k, v in flatten(self.module.extra_state()).items()}
        return state or None

    def sharded_state(self) -> dict[str, Any] | None:
        return self.teacher.shard_state() if self.teacher is not None else None

    def load_extra_state(self, state: dict[str, Any] | None, shard_files: list[Path]) -> None:
        if self.teacher is None and not hasattr(self.module, "extra_state"):
            return
        if state is None and not shard_files:
            raise RuntimeError("the checkpoint holds no momentum teacher / queue although this task keeps them")
        state = state or {}
        if self.teacher is not None and shard_files:
            self.teacher.load_shards(shard_files)
        elif self.teacher is not None:
            self.teacher.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("teacher.")})
        if hasattr(self.module, "load_extra_state"):
            self.module.load_extra_state(unflatten({k[7:]: v for k, v in state.items() if k.startswith("module.")}))

    def saved_configs(self) -> dict[str, dict[str, Any]]:
        """The model config, and the tensors this run never trains (an export records them)."""
        return {"model_config.yaml": to_dict(self.resolved.model),
                RANDOM_INIT_FILE: {"pretrained": self.cfg.task.pretrained, "keys": self.random_init}}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dict of tensors and numbers → flat ``a.b`` keys of tensors (numbers become 0-dim tensors)."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return flat


def unflatten(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Inverse of ``flatten`` (0-dim tensors stay tensors)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
