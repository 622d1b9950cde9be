"""Small real videos for the tests: clips encoded by the project's encoder, an AVI, the broken files readers meet,
and video task shards."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from mplug_ds.data.video import encode_video

COLOURS = ((220, 30, 30), (30, 170, 60), (40, 70, 220))


def clip_frames(frames: int = 8, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """A square of one colour moving right by 2 pixels a frame over a grey background."""
    colour = COLOURS[seed % len(COLOURS)]
    out = []
    for t in range(frames):
        image = np.full((size, size, 3), 160, np.uint8)
        x = 2 + 2 * t
        image[size // 4:size // 4 + 8, x:x + 8] = colour
        out.append(image)
    return out


def clip_bytes(frames: int = 8, size: int = 32, seed: int = 0) -> bytes:
    """``clip_frames`` as H.264 MP4 bytes (8 fps)."""
    return encode_video(clip_frames(frames, size, seed), 8, size, size)


def write_avi(path: Path, frames: int, size: int = 32) -> Path:
    """An MPEG-4 AVI of ``clip_frames`` (MSVD's container); ``frames=0`` writes a valid AVI with no frame at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
        for image in clip_frames(frames, size):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_clip(path: Path, frames: int = 8, seed: int = 0) -> Path:
    """A good MP4 clip at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(clip_bytes(frames, seed=seed))
    return path


def write_truncated(path: Path) -> Path:
    """The first half of a good clip, as an interrupted download leaves it."""
    data = clip_bytes(12)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_video_shards(directory: Path, kind: str, counts: list[int]) -> str:
    """Shards of ``video_caption`` or ``video_qa`` samples (clips of 5–11 frames, a square of varying colour moving
    right), ``counts[i]`` in shard i, with a manifest; returns their brace pattern."""
    from mplug_ds.data.sample import Sample
    from tests.data.shard_utils import write_manifest, write_shard

    names = ("red", "green", "blue")
    n, written = 0, {}
    for shard, count in enumerate(counts):
        samples = []
        for _ in range(count):
            colour, video = names[n % 3], clip_bytes(5 + n % 7, seed=n)
            if kind == "video_caption":
                texts = [f"a {colour} square moves right", f"a picture of a {colour} square", f"clip {n}"][: 1 + n % 3]
                samples.append(Sample(key=f"c{n:03d}", task="video_caption", video=video, texts=texts,
                                      image_id=f"clip{n}"))
            else:
                qa = [("what colour is the square?", colour, "what"), ("which way does it move?", "right", "which"),
                      ("is it a square?", "yes", "is")][: 1 + n % 3]
                samples.append(Sample(key=f"q{n:03d}", task="video_qa", video=video, texts=[q for q, _, _ in qa],
                                      answers=[a for _, a, _ in qa], answer_weights=[1.0] * len(qa),
                                      extra={"question_ids": [100 * n + i for i in range(len(qa))],
                                             "answer_types": [t for _, _, t in qa]}))
            n += 1
        written[write_shard(directory / f"{kind}-{shard:06d}.tar", samples).name] = count
    write_manifest(directory, written)
    return f"{directory}/{kind}-{{{0:06d}..{len(counts) - 1:06d}}}.tar"
