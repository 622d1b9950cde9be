"""Tiny real NLVR2 and SNLI-VE shards for the classification task tests (drawn boxes, statements about them)."""
from __future__ import annotations

from pathlib import Path

from mplug_ds.data.sample import Sample
from tests.data.shard_utils import write_manifest, write_shard
from tests.tasks.task_data import _scene


def _write(directory: Path, prefix: str, counts: list[int], make) -> str:
    n, names = 0, {}
    for shard, count in enumerate(counts):
        samples = []
        for _ in range(count):
            samples.append(make(n))
            n += 1
        names[write_shard(directory / f"{prefix}-{shard:06d}.tar", samples).name] = count
    write_manifest(directory, names)
    return f"{directory}/{prefix}-{{{0:06d}..{len(counts) - 1:06d}}}.tar"


def write_nlvr2_shards(directory: Path, prefix: str, counts: list[int], splits: list[str], seed: int = 0) -> str:
    """NLVR2 samples: two images with one box each and a statement about the left one; labels 0, 1, 0, …"""
    def make(n: int) -> Sample:
        left, text, _ = _scene(seed * 10_000 + 2 * n, 64, 48)
        right, _, _ = _scene(seed * 10_000 + 2 * n + 1, 64, 48)
        return Sample(key=f"{prefix}_{n:05d}", task="nlvr2", images=[left, right], texts=[f"the left image: {text}"],
                      label=n % 2, split=splits[n % len(splits)])
    return _write(directory, prefix, counts, make)


def write_ve_shards(directory: Path, prefix: str, counts: list[int], splits: list[str], seed: int = 0) -> str:
    """SNLI-VE samples: one box per image and a hypothesis about it; labels 0, 1, 2, 0, …"""
    def make(n: int) -> Sample:
        image, text, _ = _scene(seed * 10_000 + n, 64 + 8 * (n % 3), 48)
        return Sample(key=f"{prefix}_{n:05d}", task="ve", image=image, texts=[f"there is {text}"], label=n % 3,
                      image_id=str(n), split=splits[n % len(splits)])
    return _write(directory, prefix, counts, make)
