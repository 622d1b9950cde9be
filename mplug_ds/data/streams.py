"""Build the pre-training batch stream and the held-out retrieval set named by a ``DataSection``.

A training stream is an endless iterator source: ``iter(stream)`` yields tensor batches forever, and
``state_dict()`` / ``load_state_dict()`` save and restore its position; ``epoch`` (when present) is the
data epoch the stream is in.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import torch.distributed as dist

from mplug_ds.data.batch import Batch, RetrievalSet
from mplug_ds.data.collate import tokenize
from mplug_ds.data.data_config import DataConfig, SourceConfig, StreamConfig, image_limits
from mplug_ds.data.demo_shards import DemoShards, demo_shards, prepare_demo_shards, world_dir
from mplug_ds.data.pipeline import ShardLoader
from mplug_ds.data.reading import DataErrors, iter_samples
from mplug_ds.data.synthetic import SyntheticPretrainBatches
from mplug_ds.data.transforms import TestTransform, pre_caption
from mplug_ds.runtime import watchdog
from mplug_ds.runtime.guards import sigterm_blocked
from mplug_ds.runtime.launch_env import WorldInfo

DataSource = Literal["demo", "shards", "synthetic"]


@dataclass
class DataSection:
    """Where pre-training batches come from.

    ``demo``: the built-in demo world, generated and sharded into ``cache_dir`` on first use.
    ``shards``: WebDataset shards listed in ``pipeline.sources`` (written by ``tools/make_shards.py``);
    ``eval_shards`` (optional caption shards) feed the end-of-run zero-shot retrieval.
    ``synthetic``: random images with real-tokenizer captions generated in-process (benchmarks, engine tests).
    ``pipeline`` is how the shard stream reads, mixes, shuffles and augments; the batch size, image size and text
    length come from ``batch.micro_batch_per_gpu``, the model and ``max_text_len``.
    """

    source: DataSource = "demo"  # demo, shards or synthetic
    max_text_len: int = 30  # most text tokens per caption including [CLS] and [SEP] (longer ones are cut)
    pipeline: StreamConfig = field(default_factory=StreamConfig)
    eval_shards: str | None = None  # caption shards for the end-of-run zero-shot retrieval (source=shards)
    cache_dir: str = "~/.cache/mplug_ds/demo"  # where the demo shards are generated once (source=demo)


def pipeline_config(data: DataSection, batch_size: int, image_res: int, patch_size: int,
                    sources: list[SourceConfig] | None = None) -> DataConfig:
    """The shard pipeline's config: ``data.pipeline`` plus pre-training captions in training mode at this geometry."""
    stream = {f.name: getattr(data.pipeline, f.name) for f in dataclasses.fields(StreamConfig)}
    stream["sources"] = sources or stream["sources"]
    return DataConfig(**stream, task="caption", train=True, batch_size=batch_size, image_res=image_res,
                      patch_size=patch_size, max_len=data.max_text_len)


class EndlessShardBatches:
    """A ``ShardLoader`` read epoch after epoch, keeping only tensor fields of each batch.

    Creating a DataLoader iterator draws a worker seed from torch's global generator; that draw happens inside
    ``fork_rng`` so the training RNG stream (dropout, masking, negatives) does not depend on when the loader
    was (re)started — a resumed run continues exactly like an uninterrupted one. Workers start with SIGTERM
    blocked, so a job-wide SIGTERM reaches only the trainer, which checkpoints and exits cleanly.
    """

    def __init__(self, loader: ShardLoader) -> None:
        self.loader = loader

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    @property
    def errors(self) -> DataErrors:
        """What this rank's loader skipped so far (counts per source in ``by_source``)."""
        return self.loader.errors

    @property
    def source_names(self) -> list[str]:
        """The names of the data sources, in config order (identical on every rank)."""
        return [src.name for src in self.loader.cfg.sources]

    @property
    def warn_skipped_fraction(self) -> float:
        """Past this fraction of skipped samples a source is reported loudly."""
        return self.loader.cfg.warn_skipped_fraction

    def __iter__(self) -> Iterator[Batch]:
        while True:
            with torch.random.fork_rng(devices=[]), sigterm_blocked():
                batches = iter(self.loader)
                first = next(batches, None)
            if first is None:
                raise RuntimeError(f"the data stream produced no batch in epoch {self.loader.epoch} "
                                   f"({self.loader.errors.corrupt_samples} corrupt samples skipped); check the shards")
            yield _tensors(first)
            for batch in batches:
                yield _tensors(batch)

    def state_dict(self) -> dict[str, Any]:
        """The loader position (epoch, per-worker sample offsets, skipped-sample counts)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position."""
        self.loader.load_state_dict(state)

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Continue from positions saved by another number of ranks (``ShardLoader.load_resharded``)."""
        self.loader.load_resharded(states)


def _tensors(batch: dict[str, Any]) -> Batch:
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _demo(cache_dir: str, world: WorldInfo) -> tuple[DemoShards, Path]:
    """Prepare the demo shards once per node (local rank 0), the other ranks wait for them."""
    cache = Path(cache_dir).expanduser()
    if world.local_rank == 0:
        prepare_demo_shards(cache)
    if dist.is_initialized() and world.world_size > 1:
        dist.barrier()
    shards = demo_shards(cache)
    if shards is None:
        raise RuntimeError(f"demo shards missing in {cache} after preparation")
    return shards, cache


def build_train_stream(data: DataSection, batch_size: int, image_res: int, patch_size: int, world: WorldInfo
                       ) -> SyntheticPretrainBatches | EndlessShardBatches:
    """This rank's endless training stream of ``batch_size`` images at ``image_res`` (ViT ``patch_size``)."""
    if data.source == "synthetic":
        return SyntheticPretrainBatches(batch_size, image_res, data.max_text_len, data.pipeline.seed, world.rank)
    sources = None
    if data.source == "demo":
        shards, cache = _demo(data.cache_dir, world)
        manifest = world_dir(cache) / "shards" / "train" / "manifest.json"
        sources = [SourceConfig("demo", shards.train, manifest=str(manifest))]
    loader = ShardLoader(pipeline_config(data, batch_size, image_res, patch_size, sources), world.rank,
                         world.world_size)
    return EndlessShardBatches(loader)


def build_eval_set(data: DataSection, image_res: int, max_samples: int, world: WorldInfo) -> RetrievalSet | None:
    """The held-out retrieval pairs (every caption of up to ``max_samples`` images), or ``None``."""
    if data.source == "synthetic":
        stream = SyntheticPretrainBatches(max_samples, image_res, data.max_text_len, data.pipeline.seed, 0)
        return stream.retrieval_set(max_samples)
    if data.source == "demo":
        pattern = _demo(data.cache_dir, world)[0].test
    elif data.eval_shards:
        pattern = data.eval_shards
    else:
        return None
    transform = TestTransform(image_res)
    images, texts, owners = [], [], []
    for sample in iter_samples(pattern, limits=image_limits(data.pipeline)):
        watchdog.beat(evaluation_images_read=len(images))
        captions = [c for c in (pre_caption(t, data.pipeline.max_words) for t in sample.texts) if c]
        if sample.image is None or not captions:
            continue
        texts += captions
        owners += [len(images)] * len(captions)
        images.append(transform(sample.image))
        if len(images) >= max_samples:
            break
    if not images:
        return None
    ids, mask = tokenize(texts, data.max_text_len)
    return RetrievalSet(torch.stack(images), ids, mask, torch.tensor(owners))
