"""Helpers for data tests: write small real WebDataset shards in the layout of ``mplug_ds.data.sample``."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from mplug_ds.data.sample import Sample


def jpeg_bytes(width: int = 48, height: int = 40, seed: int = 0) -> bytes:
    """A small random-noise RGB JPEG."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def caption_sample(key: str, n_captions: int = 2, seed: int = 0, width: int = 48, height: int = 40) -> Sample:
    """A caption sample with JPEG bytes and ``n_captions`` distinct captions."""
    texts = [f"A photo, number {seed} of {key}: caption {i}!" for i in range(n_captions)]
    return Sample(key=key, task="caption", image=jpeg_bytes(width, height, seed), texts=texts)


def write_shard(path: Path, samples: list[Sample], corrupt_jpeg: set[str] = frozenset(),
                corrupt_json: set[str] = frozenset()) -> Path:
    """Write ``samples`` to one tar; keys in ``corrupt_jpeg``/``corrupt_json`` get garbage in that member."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), mtime=0) as sink:
        for s in samples:
            record: dict[str, object] = {"__key__": s.key}
            record["json"] = b"{not json" if s.key in corrupt_json else s.meta_json()
            if s.video is not None:
                record["mp4"] = s.video
            elif s.images:
                record["left.jpg"], record["right.jpg"] = s.images
            elif s.image is not None:
                record["jpg"] = b"\xff\xd8\xff\xe0garbage" if s.key in corrupt_jpeg else s.image
            sink.write(record)
    return path


def write_caption_shards(directory: Path, prefix: str, n_shards: int, per_shard: int,
                         n_captions: int = 2) -> tuple[str, list[str]]:
    """``n_shards`` shards of caption samples; returns (brace pattern, all keys in order)."""
    keys: list[str] = []
    for shard in range(n_shards):
        samples = [caption_sample(f"{prefix}_{shard:03d}_{i:03d}", n_captions, seed=shard * 1000 + i)
                   for i in range(per_shard)]
        keys += [s.key for s in samples]
        write_shard(directory / f"{prefix}-{shard:06d}.tar", samples)
    return f"{directory}/{prefix}-{{{0:06d}..{n_shards - 1:06d}}}.tar", keys


def write_manifest(directory: Path, counts: dict[str, int]) -> Path:
    """A ``manifest.json`` listing shard file names and their sample counts."""
    path = directory / "manifest.json"
    path.write_text(json.dumps({"shards": [{"name": n, "samples": c} for n, c in counts.items()]}))
    return path


def truncate(path: Path, keep_fraction: float) -> None:
    """Cut a tar file short, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
