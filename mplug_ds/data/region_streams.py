"""TiMix's second stream: region batches (images + phrase/box patch labels) joined to every caption batch.

The patch-text alignment loss needs region shards (Visual Genome regions/objects, RefCOCO, X-VLM region JSON,
written by ``tools/make_shards.py`` with task ``region``). Each caption batch gets the next region batch of the
same rank under ``region_*`` keys; both positions are saved, so a resumed run continues both streams exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch

from mplug_ds.data.collate import tokenize
from mplug_ds.data.data_config import DataConfig, SourceConfig, StreamConfig
from mplug_ds.data.transforms import box_to_patch_labels
from mplug_ds.data.synthetic import _word_list

# collate_region's fields as the joined batch names them (its ``image`` becomes ``region_image``).
REGION_FIELDS = {"image": "region_image", "region_text_ids": "region_text_ids",
                 "region_text_mask": "region_text_mask", "patch_labels": "patch_labels",
                 "region_image_index": "region_image_index"}


def region_pipeline_config(regions: StreamConfig, images_per_gpu: int, image_res: int, patch_size: int,
                           max_len: int, sources: list[SourceConfig] | None = None) -> DataConfig:
    """The region pipeline's config: ``regions`` (sources, workers, max_regions …) with the run-owned fields set."""
    stream = {f.name: getattr(regions, f.name) for f in dataclasses.fields(StreamConfig)}
    stream["sources"] = sources or stream["sources"]
    return DataConfig(**stream, task="region", train=True, batch_size=images_per_gpu, image_res=image_res,
                      patch_size=patch_size, max_len=max_len)


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

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Both streams from positions saved by another number of ranks."""
        if any(set(state) != {"captions", "regions"} for state in states):
            raise ValueError("the checkpoint's data position was not saved by a TiMix run (no region stream position)"
                             "; resume it with timix.enabled=false")
        self.captions.load_resharded([state["captions"] for state in states])
        self.regions.load_resharded([state["regions"] for state in states])


class SyntheticRegionBatches:
    """Region batches generated in-process (benchmarks, engine tests): random images, phrases of real words,
    random boxes → patch labels, ``phrases_per_image`` phrases per image. Batch ``i`` depends only on
    ``(seed, rank, i)``, so the position is one integer and resuming is exact."""

    def __init__(self, images: int, image_size: int, patch_size: int, max_text_len: int, seed: int, rank: int,
                 phrases_per_image: int = 4) -> None:
        self.images, self.image_size, self.patch_size = images, image_size, patch_size
        self.max_text_len, self.seed, self.rank, self.phrases = max_text_len, seed, rank, phrases_per_image
        self.next_index = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            batch = self.batch(self.next_index)
            self.next_index += 1
            yield batch

    def batch(self, index: int) -> dict[str, Any]:
        """Batch number ``index`` of this rank, in ``collate_region``'s layout."""
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_033 + index + 7) % 2**62)
        words, res, count = _word_list(), self.image_size, self.images * self.phrases
        picks = torch.randint(len(words), (count, 3), generator=gen).tolist()
        corners = torch.rand(count, 2, 2, generator=gen).sort(dim=1).values * res
        labels = [box_to_patch_labels([c[0, 0], c[0, 1], c[1, 0], c[1, 1]], res, self.patch_size)
                  for c in corners]
        ids, mask = tokenize([" ".join(words[i] for i in p) for p in picks], self.max_text_len)
        return {"image": torch.rand(self.images, 3, res, res, generator=gen) * 2 - 1, "region_text_ids": ids,
                "region_text_mask": mask, "patch_labels": torch.stack(labels),
                "region_image_index": torch.arange(self.images).repeat_interleave(self.phrases)}

    def state_dict(self) -> dict[str, Any]:
        """The stream position."""
        return {"next_index": self.next_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by ``state_dict``."""
        self.next_index = int(state["next_index"])

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Continue past the furthest position saved by another number of ranks."""
        self.next_index = max(int(state["next_index"]) for state in states)
