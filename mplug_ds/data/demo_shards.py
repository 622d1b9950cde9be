"""The demo's data: the procedural demo world (``mplug_ds.data.demo``), sharded once into a cache directory.

``<cache_dir>/world-<fingerprint>/shards/{train,test}/`` hold caption shards (COCO-Karpathy format read by
``mplug_ds.data.formats``, written by ``mplug_ds.data.shards``), reused by later runs; ``shards/regions/`` (written
when TiMix asks for it) holds the Visual Genome region phrases of the train-split images, for patch-text alignment.
The fingerprint hashes the generator's source and settings, so a changed demo world never reuses shards of an
older one. Preparation happens in a temporary directory that is renamed into place, so an interrupted first run
never leaves half-written shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mplug_ds.data import demo
from mplug_ds.data.demo import generate_demo
from mplug_ds.data.formats import ReaderArgs, read_format
from mplug_ds.data.shards import ShardOptions, write_shards

DEMO_IMAGES = 2400
DEMO_IMAGE_SIZE = 128
DEMO_SEED = 0
SPLITS = ("train", "test")
REGIONS = "regions"

log = logging.getLogger("mplug_ds.demo")


@dataclass(frozen=True)
class DemoShards:
    """Shard patterns and sample counts of the demo's train and held-out test splits."""

    train: str
    test: str
    train_samples: int
    test_samples: int
    regions: str | None = None  # region shards of the train images (only once prepared with regions=True)


@lru_cache(maxsize=1)
def world_fingerprint() -> str:
    """Identifies the demo world: a hash of the generator's source and of the settings used here (once per
    process, so editing or upgrading the package during a run does not move its shards)."""
    digest = hashlib.sha256(Path(demo.__file__).read_bytes())
    digest.update(f"images={DEMO_IMAGES} size={DEMO_IMAGE_SIZE} seed={DEMO_SEED}".encode())
    return digest.hexdigest()[:12]


def world_dir(cache_dir: Path) -> Path:
    """This demo world's folder inside ``cache_dir``."""
    return cache_dir.expanduser() / f"world-{world_fingerprint()}"


def _pattern(split_dir: Path) -> tuple[str, int]:
    manifest = json.loads((split_dir / "manifest.json").read_text())
    names = [s["name"] for s in manifest["shards"]]
    return "::".join(str(split_dir / n) for n in names), int(manifest["total_samples"])


def demo_shards(cache_dir: Path) -> DemoShards | None:
    """The prepared demo shards under ``cache_dir``, or ``None`` when they have not been written yet."""
    shard_dir = world_dir(cache_dir) / "shards"
    if not all((shard_dir / split / "manifest.json").is_file() for split in SPLITS):
        return None
    (train, n_train), (test, n_test) = (_pattern(shard_dir / split) for split in SPLITS)
    regions = _pattern(shard_dir / REGIONS)[0] if (shard_dir / REGIONS / "manifest.json").is_file() else None
    return DemoShards(train, test, n_train, n_test, regions)


def prepare_demo_shards(cache_dir: Path, regions: bool = False) -> DemoShards:
    """Generate and shard the demo world into ``cache_dir`` unless it is already there (with ``regions``: also
    the region shards)."""
    ready = demo_shards(cache_dir)
    if ready is not None and (ready.regions is not None or not regions):
        return ready
    world = world_dir(cache_dir)
    log.info("first use of this demo world: generating %d images and sharding them into %s", DEMO_IMAGES, world)
    started = time.monotonic()
    world.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=world, prefix=".preparing-"))
    try:
        raw = work / "raw"
        generate_demo(raw, seed=DEMO_SEED, num_images=DEMO_IMAGES, image_size=DEMO_IMAGE_SIZE)
        reader_args = ReaderArgs(ann=[raw / "coco" / "dataset_coco.json"], images=raw / "coco")
        for split in SPLITS:
            options = ShardOptions(out=work / "shards" / split, prefix=f"demo-{split}", format_name="coco-karpathy",
                                   shard_size=200, inputs=[str(raw / "coco" / "dataset_coco.json")], progress=False)
            write_shards(read_format("coco-karpathy", reader_args, [split]), options)
        if regions:
            _write_region_shards(raw, work / "shards" / REGIONS)
        for split in (*SPLITS, REGIONS) if regions else SPLITS:  # names are relative: manifests survive the move
            target = world / "shards" / split
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                (work / "shards" / split).rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    prepared = demo_shards(cache_dir)
    if prepared is None or (regions and prepared.regions is None):
        raise RuntimeError(f"preparing the demo shards in {cache_dir} failed (no manifest.json written)")
    log.info("demo data ready in %.0f s (%d train / %d test images)", time.monotonic() - started,
             prepared.train_samples, prepared.test_samples)
    return prepared


def _write_region_shards(raw: Path, out: Path) -> None:
    """Region shards (Visual Genome format) of the images in the caption train split only: the alignment task
    must not see the held-out retrieval images."""
    captions = read_format("coco-karpathy", ReaderArgs(ann=[raw / "coco" / "dataset_coco.json"], images=raw / "coco"),
                           ["train"])
    train_ids = {s.image_id for s in captions if hasattr(s, "image_id")}
    vg = raw / "vg"
    args = ReaderArgs(ann=[vg / "region_descriptions.json", vg / "image_data.json"], images=vg)
    samples = (s for s in read_format("vg-regions", args) if not hasattr(s, "image_id") or s.image_id in train_ids)
    write_shards(samples, ShardOptions(out=out, prefix="demo-regions", format_name="vg-regions", shard_size=200,
                                       inputs=[str(vg / "region_descriptions.json")], progress=False))
