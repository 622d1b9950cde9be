"""Pre-training as a ``Recipe``: the mPLUG model under the four objectives, its momentum teacher, the caption
stream named by ``data`` and the end-of-run zero-shot retrieval."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mplug_ds.config import to_dict
from mplug_ds.data.streams import build_eval_set, build_train_stream
from mplug_ds.distributed import range_over_ranks
from mplug_ds.objectives.zero_shot import retrieval_picture_path, zero_shot_retrieval
from mplug_ds.engine.export import load_weights
from mplug_ds.engine.recipe import Recipe, TrainStream
from mplug_ds.objectives.pretrain_config import ResolvedRun, TrainConfig
from mplug_ds.models.mplug import build_model
from mplug_ds.models.weights import init_public_weights
from mplug_ds.objectives.pretrain import PretrainModel
from mplug_ds.runtime.launch_env import WorldInfo

LOSS_KEYS = ("loss", "loss_ita", "loss_itm", "loss_mlm", "loss_prefix")


class PretrainRecipe(Recipe):
    """ITA + ITM + MLM + prefix LM with an fp32 momentum teacher outside the DeepSpeed module."""

    loss_keys = LOSS_KEYS

    def __init__(self, cfg: TrainConfig, resolved: ResolvedRun, world: WorldInfo) -> None:
        self.cfg, self.resolved, self.world = cfg, resolved, world
        model = build_model(resolved.model)
        if cfg.model.init_from:
            load_weights(model, cfg.model.init_from)
        for line in init_public_weights(model, cfg.model.init_vision_from, cfg.model.init_text_from):
            if world.rank == 0:
                print(line, flush=True)
        self.module = PretrainModel(model, resolved.objective)
        self.teacher = self.module.teacher  # None without distillation

    def train_stream(self) -> TrainStream:
        v = self.resolved.model.vision
        return build_train_stream(self.cfg.data, self.cfg.batch.micro_batch_per_gpu, v.image_size, v.patch_size,
                                  self.world)

    def step_args(self, step: int) -> dict[str, float]:
        """The distillation weight, ramped linearly over ``schedule.alpha_warmup_steps``."""
        target, ramp = self.resolved.objective.alpha, self.cfg.schedule.alpha_warmup_steps
        return {"alpha": target if ramp == 0 else target * min(1.0, step / ramp)}

    def param_group_key(self, param: Any) -> str:
        return self.teacher.group_key(param) if self.teacher is not None else ""

    def engine_ready(self, engine: Any) -> None:
        if self.teacher is not None:
            self.teacher.attach(engine)

    def after_optimizer_step(self) -> None:
        if self.teacher is not None:
            self.teacher.update()

    def evaluate(self, engine: Any) -> dict[str, float]:
        """Zero-shot retrieval on the held-out split (``eval.retrieval``); empty when there is none."""
        e = self.cfg.eval
        if not e.retrieval:
            return {}
        eval_set = build_eval_set(self.cfg.data, self.resolved.model.vision.image_size, e.max_samples, self.world)
        # Each rank reads the held-out set itself: a rank that read other files (or fewer samples) would run other
        # forwards than the rest (collectives under ZeRO-3). Every rank checks that they agree.
        sizes = [0, 0] if eval_set is None else [len(eval_set.images), len(eval_set.text_ids)]
        fewest, most = range_over_ranks(sizes, engine.device)
        if fewest != most:
            raise RuntimeError(f"the ranks read different held-out retrieval sets: from {fewest[0]} to {most[0]} "
                               f"images and {fewest[1]} to {most[1]} captions (this rank: {sizes[0]}, {sizes[1]}); "
                               "data.eval_shards (or the demo cache) must hold the same files on every node")
        if eval_set is None:
            return {}
        picture = retrieval_picture_path(self.cfg.output_dir, engine.global_steps) if self.world.rank == 0 else None
        return zero_shot_retrieval(engine, self.module.model, eval_set, e.batch_size, picture)

    def extra_state(self) -> dict[str, Any] | None:
        return self.teacher.state_dict() if self.teacher is not None else None

    def sharded_state(self) -> dict[str, Any] | None:
        return self.teacher.shard_state() if self.teacher is not None else None

    def load_extra_state(self, state: dict[str, Any] | None, shard_files: list[Path]) -> None:
        if self.teacher is None:
            return
        if shard_files:
            self.teacher.load_shards(shard_files)
        elif state is not None:
            self.teacher.load_state_dict(state)
        else:
            raise RuntimeError("the checkpoint has no momentum teacher but objective.distill is on")

    def saved_configs(self) -> dict[str, dict[str, Any]]:
        return {"model_config.yaml": to_dict(self.resolved.model)}
