"""Configuration of a data stream: its shard sources and how samples are prepared and batched."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mplug_ds.data.reading import ImageLimits, expand_urls
from mplug_ds.data.sample import Task


@dataclass
class SourceConfig:
    """One shard set: a brace URL pattern, its mixing weight and an optional manifest with sample counts."""

    name: str  # a label for logs and skip reports
    shards: str  # shard URLs: braces '/d/{000000..000331}.tar', globs, or several joined by '::'
    weight: float = 1.0  # mixing weight among the sources of a resampled stream
    manifest: str | None = None  # manifest.json (tools/make_shards.py) or sizes.json with per-shard sample counts


@dataclass
class StreamConfig:
    """How a stream reads, mixes, shuffles and augments samples: what a run's YAML sets under ``data.pipeline``.

    ``resampled`` streams draw shards with replacement and mix sources per sample by ``weight``; an epoch is
    ``epoch_samples`` samples over all ranks (default: the manifests' total). Non-resampled streams read every
    shard of every source once per epoch, split by rank then by worker (weights are not used).
    """

    sources: list[SourceConfig] = field(default_factory=list)  # the shard sets to read
    resampled: bool = True  # draw shards with replacement and mix sources by weight (else: each shard once)
    num_workers: int = 4  # DataLoader worker processes per rank
    seed: int = 42  # seed of shard order, shuffling and augmentation
    scale_min: float = 0.2  # RandomResizedCrop lower scale: 0.2 pre-training, 0.5 fine-tuning
    augment: bool = True  # training images: horizontal flip + RandAugment (off where texts name colours and sides)
    max_words: int = 30  # captions are cut to this many words before tokenizing
    answer_max_len: int = 10  # VQA answer tokens including [SEP]
    max_regions: int = 5  # region texts kept per image (region task)
    min_region_inside: float = 0.5  # a region is kept when this share of its box survives the crop
    careful_flip: bool = False  # swap 'left'/'right' in region texts when the crop is flipped
    shard_shuffle: bool = True  # shuffle the shard order each epoch
    shuffle_buffer: int = 1000  # samples held in the per-worker shuffle buffer
    shuffle_initial: int = 100  # samples buffered before the first one is yielded
    epoch_samples: int | None = None  # samples per epoch over all ranks (default: the manifests' total)
    drop_last: bool = True  # drop a worker's last incomplete batch
    # Larger or more elongated images are skipped and counted like corrupt samples (checked before decoding).
    max_image_pixels: int = 40_000_000  # images with more pixels are skipped and counted
    max_image_aspect: float = 20.0  # images more elongated than this are skipped and counted
    warn_skipped_fraction: float = 0.01  # warn loudly once a source skipped more than this share of samples read


@dataclass
class DataConfig(StreamConfig):
    """A training or evaluation stream: the ``StreamConfig`` plus the fields its owner sets (task, batch geometry).

    In a pre-training run those fields come from the run config (``batch.micro_batch_per_gpu``, the model,
    ``data.max_text_len``); a fine-tuning task sets them from its own config.
    """

    task: Task = "caption"  # which preparation and collate: caption, region, vqa, grounding, nlvr2, ve
    train: bool = True  # training transforms (random crops, flips) and training-only checks
    batch_size: int = 64  # samples per batch on each rank
    image_res: int = 256  # image side after the transform
    patch_size: int = 16  # ViT patch size (box → patch labels)
    max_len: int = 30  # text tokens including [CLS] and [SEP]


def check_full_batches(cfg: StreamConfig, where: str) -> None:
    """A training stream keeps ``drop_last``: a worker's short last batch would give the ranks different batch sizes
    (the contrastive all-gathers need one size on every rank) and can hold fewer than the 2 samples ITM needs."""
    if not cfg.drop_last:
        raise ValueError(f"{where}.drop_last must be true for training: a short last batch on one rank gives the "
                         "ranks different batch sizes, which the contrastive all-gather cannot combine")


def image_limits(cfg: StreamConfig) -> ImageLimits:
    """The image size limits of a data config."""
    return ImageLimits(cfg.max_image_pixels, cfg.max_image_aspect)


_COUNT_KEYS = ("samples", "num_samples", "count", "n")
_NAME_KEYS = ("name", "path", "url", "file", "shard")


def read_manifest(path: str | Path) -> dict[str, int]:
    """Per-shard sample counts by shard file name, from ``{"shards": [{"name", "samples"}, ...]}`` or
    ``{"<file>.tar": count}`` (OpenCLIP ``sizes.json``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the shard manifest ({err}); rewrite it with tools/make_shards.py") from err
    entries = data.get("shards") if isinstance(data, dict) else None
    if entries is None and isinstance(data, dict):
        return {Path(k).name: int(v) for k, v in data.items() if isinstance(v, int)}
    counts = {}
    for i, entry in enumerate(entries or []):
        name = next((entry[k] for k in _NAME_KEYS if k in entry), None)
        count = next((entry[k] for k in _COUNT_KEYS if k in entry), None)
        if name is None or not isinstance(count, int):
            raise ValueError(f"{path}: shards[{i}] needs a name ({'/'.join(_NAME_KEYS)}) and an integer sample "
                             f"count ({'/'.join(_COUNT_KEYS)}); got {entry!r}")
        counts[Path(name).name] = count
    return counts


def source_size(source: SourceConfig) -> int:
    """Number of samples in a source's shards according to its manifest."""
    if source.manifest is None:
        raise ValueError(f"source '{source.name}' has no manifest: set data.sources[].manifest to its "
                         "manifest.json, or set data.epoch_samples")
    counts = read_manifest(source.manifest)
    missing = [u for u in expand_urls(source.shards) if Path(u).name not in counts]
    if missing:
        raise ValueError(f"{source.manifest}: no sample count for shard {missing[0]} of source '{source.name}'; "
                         "regenerate the manifest or fix data.sources[].shards")
    return sum(counts[Path(u).name] for u in expand_urls(source.shards))
