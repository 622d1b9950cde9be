"""The demo's fine-tuning data: task shards cut from the procedural demo world, prepared once into a cache.

``<cache_dir>/world-<fingerprint>/shards/`` already holds the demo's caption shards (``train``, ``test``: COCO-Karpathy format), which
are also the retrieval task's train and evaluation sets (one sample per image with all its captions and image
id). Grounding gets ``refcoco/train`` and ``refcoco/eval`` (val, testA and testB expressions, each labelled with
its split), read by the refer-toolkit reader from the same world. Preparation happens in a temporary directory
that is renamed into place, so an interrupted first run never leaves half-written shards behind.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mplug_ds.data.demo import generate_demo
from mplug_ds.data.formats import ReaderArgs, read_format
from mplug_ds.data.shards import ShardOptions, write_shards
from mplug_ds.data.demo_shards import DEMO_IMAGE_SIZE, DEMO_IMAGES, DEMO_SEED, prepare_demo_shards, world_dir

GROUNDING_SPLITS = {"train": ["train"], "eval": ["val", "testA", "testB"]}


@dataclass(frozen=True)
class TaskShards:
    """Training shards (with their manifest) and evaluation shards of one task."""

    train: str
    train_manifest: str
    eval: str


def _split_shards(split_dir: Path) -> str:
    return str(split_dir / "*.tar")


def prepare_demo_task_shards(cache_dir: Path, task: str) -> TaskShards:
    """Shards of ``task`` (``grounding`` | ``retrieval``) from the demo world, written on first use."""
    cache_dir = Path(cache_dir).expanduser()
    if task == "retrieval":
        shards = prepare_demo_shards(cache_dir)
        return TaskShards(shards.train, str(world_dir(cache_dir) / "shards" / "train" / "manifest.json"), shards.test)
    if task != "grounding":
        raise ValueError(f"the demo has no data for task '{task}' (grounding, retrieval)")
    root = world_dir(cache_dir) / "shards" / "refcoco"
    if not all((root / split / "manifest.json").is_file() for split in GROUNDING_SPLITS):
        root.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=root.parent, prefix=".preparing-refcoco-"))
        try:
            raw = work / "raw"
            generate_demo(raw, seed=DEMO_SEED, num_images=DEMO_IMAGES, image_size=DEMO_IMAGE_SIZE)
            args = ReaderArgs(ann=[raw / "refcoco"], images=raw / "coco", dataset="refcoco", split_by="unc")
            for name, splits in GROUNDING_SPLITS.items():
                options = ShardOptions(out=work / "refcoco" / name, prefix=f"refcoco-{name}", format_name="refcoco",
                                       shard_size=1000, inputs=[str(raw / "refcoco")], progress=False)
                write_shards(read_format("refcoco", args, splits), options)
            if not root.exists():
                (work / "refcoco").rename(root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return TaskShards(_split_shards(root / "train"), str(root / "train" / "manifest.json"),
                      _split_shards(root / "eval"))
