"""TiMix pre-training as a ``Recipe``: the pre-training recipe with the TiMix objective and a region stream."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from mplug_ds.data.data_config import SourceConfig
from mplug_ds.data.demo_shards import demo_shards, prepare_demo_shards, world_dir
from mplug_ds.data.pipeline import ShardLoader
from mplug_ds.data.region_streams import SyntheticRegionBatches, WithRegions, region_pipeline_config
from mplug_ds.data.streams import EndlessShardBatches
from mplug_ds.engine.recipe import TrainStream
from mplug_ds.objectives.pretrain_config import ResolvedRun, TrainConfig
from mplug_ds.objectives.pretrain_recipe import LOSS_KEYS, PretrainRecipe
from mplug_ds.objectives.timix import LOG_KEYS, TimixPretrainModel
from mplug_ds.runtime.launch_env import WorldInfo

THREE_STEPS = ({"phase": "pta"}, {"phase": "main"}, {"phase": "mix"})


class TimixRecipe(PretrainRecipe):
    """mPLUG losses + patch-text alignment + text-aware mixing; one optimizer step per batch unless
    ``timix.step_order`` asks for the reference's three."""

    loss_keys = LOSS_KEYS + LOG_KEYS

    def __init__(self, cfg: TrainConfig, resolved: ResolvedRun, world: WorldInfo) -> None:
        super().__init__(cfg, resolved, world)  # the model (with its patch predictor, from validation), weights loaded
        self.module = TimixPretrainModel(self.module.model, resolved.objective, cfg.timix)
        self.teacher = self.module.teacher
        self.three_steps = cfg.timix.step_order == "reference_three_steps"

    def phases(self, step: int) -> tuple[dict[str, str], ...]:
        """Fused: one forward/backward/optimizer step per batch. Reference order: PTA, main, then mixed (the
        mixed phase only while γ > 0), each with its own optimizer step."""
        if not self.three_steps:
            return ({},)
        return THREE_STEPS if self.cfg.timix.gamma(step) > 0 else THREE_STEPS[:2]

    def train_stream(self) -> TrainStream:
        return WithRegions(super().train_stream(), self._region_stream())

    def step_args(self, step: int) -> dict[str, float]:
        """The distillation weight and γ, the mixed loss's weight (ramped in, then off after ``mix_stop_step``)."""
        return {**super().step_args(step), "gamma": self.cfg.timix.gamma(step)}

    def _region_stream(self) -> Any:
        t, d, v = self.cfg.timix, self.cfg.data, self.resolved.model.vision
        if d.source == "synthetic":
            return SyntheticRegionBatches(t.region_images_per_gpu, v.image_size, v.patch_size, d.max_text_len,
                                          t.regions.seed, self.world.rank)
        sources = None
        if d.source == "demo":
            cache = Path(d.cache_dir).expanduser()
            if self.world.local_rank == 0:
                prepare_demo_shards(cache, regions=True)
            if dist.is_initialized() and self.world.world_size > 1:
                dist.barrier()
            shards = demo_shards(cache)
            if shards is None or shards.regions is None:
                raise RuntimeError(f"demo region shards missing in {cache} after preparation")
            sources = [SourceConfig("demo-regions", shards.regions,
                                    manifest=str(world_dir(cache) / "shards" / "regions" / "manifest.json"))]
        config = region_pipeline_config(t.regions, t.region_images_per_gpu, v.image_size, v.patch_size,
                                        d.max_text_len, sources)
        return EndlessShardBatches(ShardLoader(config, self.world.rank, self.world.world_size))


def pretrain_recipe(cfg: TrainConfig, resolved: ResolvedRun) -> Callable[[WorldInfo], PretrainRecipe]:
    """The recipe factory a pre-training config asks for: TiMix when ``timix.enabled``, plain mPLUG otherwise."""
    return partial(TimixRecipe if cfg.timix.enabled else PretrainRecipe, cfg, resolved)
