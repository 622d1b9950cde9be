"""Video bytes in, frames out: the decoder interface, its PyAV implementation, and H.264 encoding.

A shard stores each video's encoded bytes as they are (``<key>.mp4`` …); frames are decoded from those bytes in
memory, in the loader workers, only when a sample is prepared. ``VideoDecoder`` is the interface the pipeline uses
(PyAV, which bundles FFmpeg, is the implementation; another library such as torchcodec would be a second class with
the same two methods). Decoding reads the clip from its start and stops after the last frame needed, so only the
frames up to there are decoded and only the chosen ones are converted to RGB; the frame count comes from the
container when it states one, else from a counting pass. FFmpeg runs one thread per decoder: the loader's worker
processes are the parallelism.

``encode_video`` writes H.264 MP4 (libx264, or MPEG-4 part 2 where the FFmpeg build lacks it): the demo's clips and
``make_shards --resize`` (``reencode``).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import av
import numpy as np
from PIL import Image

ENCODERS = ("libx264", "mpeg4")  # in order of preference
DEFAULT_FPS = 25.0


@dataclass(frozen=True)
class VideoInfo:
    """What a full decode of a video found: decodable frames, frame size, rate and codec."""

    frames: int
    width: int
    height: int
    fps: float
    codec: str


class VideoDecoder(Protocol):
    """What the pipeline needs from a video library."""

    def probe(self, data: bytes) -> VideoInfo:
        """Decode every frame of ``data`` (the shard writer's check); ``ValueError`` when it is no usable video."""

    def read(self, data: bytes, choose: Callable[[int], Sequence[int]],
             check_size: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        """The RGB frames ``choose(number of frames)`` names, in that order; ``check_size(width, height)`` may
        reject the video before any frame is decoded. ``ValueError`` for a video that cannot be decoded."""


class PyAVDecoder:
    """``VideoDecoder`` on PyAV (FFmpeg): containers opened from bytes in memory, one decoding thread."""

    def probe(self, data: bytes) -> VideoInfo:
        with _open(data) as (container, stream):
            count, size = 0, None
            for frame in container.decode(stream):
                size = size or (frame.width, frame.height)
                count += 1
            if count == 0:
                raise ValueError(f"video has no frames ({stream.codec_context.name})")
            return VideoInfo(count, size[0], size[1], _fps(stream), stream.codec_context.name)

    def read(self, data: bytes, choose: Callable[[int], Sequence[int]],
             check_size: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        with _open(data) as (container, stream):
            if check_size is not None:
                check_size(stream.codec_context.width, stream.codec_context.height)
            if stream.frames > 0:
                picked, length = _pick(container, stream, list(choose(stream.frames)))
                if picked is not None:
                    return picked
            else:  # the container states no frame count: count them first
                length = sum(1 for _ in container.decode(stream))
        if length == 0:
            raise ValueError("video has no frames")
        with _open(data) as (container, stream):  # a second pass, knowing the real number of frames
            picked, _ = _pick(container, stream, list(choose(length)))
        return picked


class _open:
    """``with _open(data) as (container, first video stream)``; FFmpeg errors become ``ValueError``."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __enter__(self) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
        try:
            self.container = av.open(io.BytesIO(self.data), mode="r")
        except (av.error.FFmpegError, UnicodeDecodeError) as err:
            raise ValueError(f"not a readable video container ({type(err).__name__}: {err})") from None
        if not self.container.streams.video:
            self.container.close()
            raise ValueError("the container holds no video stream")
        stream = self.container.streams.video[0]
        stream.thread_type, stream.codec_context.thread_count = "SLICE", 1
        return self.container, stream

    def __exit__(self, kind, value, traceback) -> bool:
        self.container.close()
        if isinstance(value, av.error.FFmpegError):
            raise ValueError(f"undecodable video ({type(value).__name__}: {value})") from None
        return False


def _pick(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
          indices: list[int]) -> tuple[list[Image.Image] | None, int]:
    """(the RGB frames at ``indices``, or ``None`` when the clip ends before the last of them; frames decoded)."""
    wanted, last = set(indices), max(indices)
    images: dict[int, Image.Image] = {}
    position = -1
    for position, frame in enumerate(container.decode(stream)):
        if position in wanted:
            images[position] = frame.to_image()
        if position == last:
            return [images[i] for i in indices], position + 1
    return None, position + 1


def _fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else DEFAULT_FPS


def available_encoder() -> str:
    """The first encoder of ``ENCODERS`` this FFmpeg build has."""
    for name in ENCODERS:
        if name in av.codecs_available:
            return name
    raise RuntimeError(f"PyAV's FFmpeg has none of the encoders {ENCODERS}; reinstall av (pip install av)")


def encode_video(frames: Iterable[np.ndarray | Image.Image], fps: float, width: int, height: int,
                 crf: int = 23) -> bytes:
    """MP4 bytes of RGB ``frames`` (each ``width`` × ``height``; even sides, as 4:2:0 chroma needs) at ``fps``,
    one thread (the output does not depend on the machine)."""
    if width % 2 or height % 2:
        raise ValueError(f"frames of {width}x{height}: H.264 4:2:0 needs even sides")
    codec = available_encoder()
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in frames:
            image = frame if isinstance(frame, np.ndarray) else np.asarray(frame.convert("RGB"))
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def resized_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Even frame sides with the longer one at most ``max_side`` (aspect kept; videos are only shrunk)."""
    scale = min(1.0, max_side / max(width, height))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def reencode(data: bytes, max_side: int) -> tuple[bytes, VideoInfo]:
    """``data`` re-encoded as H.264 MP4 with its longer side at most ``max_side`` at the same frame rate, frame by
    frame (no audio), with the ``VideoInfo`` of the result."""
    with _open(data) as (container, stream):
        width, height = resized_size(stream.codec_context.width, stream.codec_context.height, max_side)
        fps = _fps(stream)
        count = 0

        def scaled() -> Iterator[np.ndarray]:
            nonlocal count
            for frame in container.decode(stream):
                count += 1
                yield frame.reformat(width=width, height=height, format="rgb24",
                                     interpolation="BICUBIC").to_ndarray()

        out = encode_video(scaled(), fps, width, height)
    if count == 0:
        raise ValueError("video has no frames")
    return out, VideoInfo(count, width, height, fps, available_encoder())
