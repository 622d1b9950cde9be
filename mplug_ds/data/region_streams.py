"""TiMix's second stream: region batches (images + phrase/box patch labels) joined to every caption batch.

The patch-text alignment loss needs region shards (Visual Genome regions/objects, RefCOCO, X-VLM region JSON,
written by ``tools/make_shards.py`` with task ``region``). Each caption batch gets the next region batch of the
same rank under ``region_*`` keys; both positions are saved, so a resumed run continues both streams exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from mplug_ds.data.data_config import DataConfig, SourceConfig

# collate_region's fields as the joined batch names them (its ``image`` becomes ``region_image``).
REGION_FIELDS = {"image": "region_image", "region_text_ids": "region_text_ids",
                 "region_text_mask": "region_text_mask", "patch_labels": "patch_labels",
                 "region_image_index": "region_image_index"}


def region_pipeline_config(regions: DataConfig, images_per_gpu: int, image_res: int, patch_size: int, max_len: int,
                           sources: list[SourceConfig] | None = None) -> DataConfig:
    """The region pipeline's config: ``regions`` (sources, workers, max_regions …) with the run-owned fields set."""
    return dataclasses.replace(regions, task="region", train=True, batch_size=images_per_gpu, image_res=image_res,
                               patch_size=patch_size, max_len=max_len, sources=sources or regions.sources)


class WithRegions:
    """Caption batches, each joined with the next region batch; ``state_dict`` holds both positions."""

    def __init__(self, captions: Any, regions: Any) -> None:
        self.captions, self.regions = captions, regions

    @property
    def epoch(self) -> int:
        return getattr(self.captions, "epoch", 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        regions = iter(self.regions)
        for batch in self.captions:
            region = next(regions)
            yield {**batch, **{name: region[key] for key, name in REGION_FIELDS.items()}}

    def state_dict(self) -> dict[str, Any]:
        """Both stream positions."""
        return {"captions": self.captions.state_dict(), "regions": self.regions.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue both streams from positions saved by ``state_dict``."""
        if set(state) != {"captions", "regions"}:
            raise ValueError("the checkpoint's data position was not saved by a TiMix run (no region stream position)"
                             "; resume it with timix.enabled=false")
        self.captions.load_state_dict(state["captions"])
        self.regions.load_state_dict(state["regions"])
