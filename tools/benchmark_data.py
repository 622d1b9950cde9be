"""Images/s of shard decode + augmentation at a given resolution, per DataLoader worker.

    python tools/benchmark_data.py --shards '/data/coco-{000000..000099}.tar' --workers 4 --batches 50
    python tools/benchmark_data.py            # writes a temporary synthetic shard set first
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from mplug_ds.data.data_config import DataConfig, SourceConfig
from mplug_ds.data.pipeline import build_loader
from mplug_ds.data.sample import Sample


def write_synthetic_shards(directory: Path, n_shards: int, per_shard: int, size: int = 480) -> str:
    """Caption shards of random photo-sized JPEGs; returns their brace pattern."""
    rng = np.random.default_rng(0)
    for shard in range(n_shards):
        with wds.TarWriter(str(directory / f"synthetic-{shard:06d}.tar")) as sink:
            for i in range(per_shard):
                noise = rng.integers(0, 256, (size * 3 // 4 // 8, size // 8, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(noise).resize((size, size * 3 // 4), Image.BILINEAR).save(buf, "JPEG", quality=90)
                sample = Sample(key=f"syn_{shard:06d}_{i:06d}", task="caption", texts=[f"synthetic image {i}"])
                sink.write({"__key__": sample.key, "jpg": buf.getvalue(), "json": sample.meta_json()})
    return f"{directory}/synthetic-{{000000..{n_shards - 1:06d}}}.tar"


def benchmark(shards: str, workers: int, batches: int, batch_size: int, res: int) -> tuple[float, float]:
    """(images/s in total, images/s per worker) over ``batches`` batches after one warm-up batch."""
    cfg = DataConfig(sources=[SourceConfig(name="bench", shards=shards)], batch_size=batch_size,
                     num_workers=workers, image_res=res, epoch_samples=(batches + 1) * batch_size * max(1, workers))
    it = iter(build_loader(cfg, rank=0, world_size=1))
    next(it)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += next(it)["image"].shape[0]
    rate = images / (time.perf_counter() - start)
    return rate, rate / max(1, workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="brace pattern of local shards (default: temporary synthetic shards)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (0 = main process)")
    parser.add_argument("--batches", type=int, default=20, help="batches to time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--res", type=int, default=256, help="output resolution")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or write_synthetic_shards(Path(tmp), n_shards=max(2, args.workers), per_shard=64)
        total, per_worker = benchmark(shards, args.workers, args.batches, args.batch_size, args.res)
    print(f"decode + augment @ {args.res}px: {total:.1f} images/s total, {per_worker:.1f} images/s per worker "
          f"({max(1, args.workers)} worker(s), {args.batches} batches of {args.batch_size})")


if __name__ == "__main__":
    main()
