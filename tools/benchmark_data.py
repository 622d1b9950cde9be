"""Images/s (or videos/s and frames/s) of shard decode + augmentation at a given resolution, per DataLoader worker.

    python tools/benchmark_data.py --shards '/data/coco-{000000..000099}.tar' --workers 4 --batches 50
    python tools/benchmark_data.py            # writes a temporary synthetic image shard set first
    python tools/benchmark_data.py --demo-video --frames 8 --res 64     # the demo video world's clips (prepared once)
    python tools/benchmark_data.py --shards '/data/msrvtt_9k/*.tar' --frames 12 --res 224 --sampling segment_random

Video shards (``make_shards`` video formats) are read like a video task's training stream: each clip's bytes decoded
in the workers, ``--frames`` frames chosen by ``--sampling``, one random crop for the clip, uint8 frames batched.
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
import typing
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from mplug_ds.data.data_config import DataConfig, SourceConfig
from mplug_ds.data.demo_tasks import prepare_demo_task_shards
from mplug_ds.data.frames import FrameSampling
from mplug_ds.data.pipeline import build_loader
from mplug_ds.data.reading import expand_urls, iter_samples
from mplug_ds.data.sample import Sample

PREPARATION = {"video_caption": "retrieval", "video_qa": "video_qa"}  # a video shard's sample task → its preparation


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


def benchmark(shards: str, workers: int, batches: int, batch_size: int, res: int, frames: int = 8,
              sampling: str = "segment_random") -> tuple[float, float, int]:
    """(samples/s in total, samples/s per worker, frames per sample: 1 for images) over ``batches`` batches after
    one warm-up batch."""
    first = next(iter_samples(expand_urls(shards)[0]))
    task = PREPARATION.get(first.task, "caption") if first.video is not None else "caption"
    cfg = DataConfig(sources=[SourceConfig(name="bench", shards=shards)], batch_size=batch_size, task=task,
                     num_workers=workers, image_res=res, epoch_samples=(batches + 1) * batch_size * max(1, workers),
                     num_frames=frames, train_frame_sampling=sampling)
    it = iter(build_loader(cfg, rank=0, world_size=1))
    next(it)
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(it)
        samples += (batch["video"] if "video" in batch else batch["image"]).shape[0]
    rate = samples / (time.perf_counter() - start)
    return rate, rate / max(1, workers), frames if first.video is not None else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="brace pattern of local shards (default: temporary synthetic shards)")
    parser.add_argument("--demo-video", action="store_true", help="the demo video world's training clips (made in "
                        "--cache-dir on first use)")
    parser.add_argument("--cache-dir", default="~/.cache/mplug_ds/demo", help="demo data cache (--demo-video)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (0 = main process)")
    parser.add_argument("--batches", type=int, default=20, help="batches to time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--res", type=int, default=256, help="output resolution")
    parser.add_argument("--frames", type=int, default=8, help="video shards: frames per clip")
    parser.add_argument("--sampling", default="segment_random", choices=typing.get_args(FrameSampling),
                        help="video shards: how the frames are chosen")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if args.demo_video:
            shards = prepare_demo_task_shards(Path(args.cache_dir), "video_retrieval").train
        shards = shards or write_synthetic_shards(Path(tmp), n_shards=max(2, args.workers), per_shard=64)
        total, per_worker, frames = benchmark(shards, args.workers, args.batches, args.batch_size, args.res,
                                              args.frames, args.sampling)
    setup = f"({max(1, args.workers)} worker(s), {args.batches} batches of {args.batch_size})"
    if frames == 1:
        print(f"decode + augment @ {args.res}px: {total:.1f} images/s total, {per_worker:.1f} images/s per worker "
              + setup)
    else:
        print(f"decode + augment @ {args.res}px, {frames} frames per clip ({args.sampling}): {total:.1f} videos/s "
              f"({total * frames:.0f} frames/s) total, {per_worker:.1f} videos/s ({per_worker * frames:.0f} frames/s) "
              "per worker " + setup)


if __name__ == "__main__":
    main()
