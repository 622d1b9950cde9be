"""Reading shards: brace/glob-expanded URLs → decoded ``Sample``s, damaged input skipped, counted and named.

Shards follow the layout in ``mplug_ds.data.sample`` (``<key>.jpg`` or ``<key>.left.jpg``/``<key>.right.jpg``, or a
video ``<key>.mp4`` …, plus ``<key>.json``). Images are decoded here; a video stays encoded bytes until its sample is
prepared (its frames depend on the frame sampling). Damaged input never stops a run: an undecodable image, a bad
``.json`` or a truncated tar is skipped, logged, counted and named in a ``DataErrors`` object.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import webdataset as wds
from PIL import Image

from mplug_ds.data.sample import VIDEO_EXTS, Sample

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PAIR_EXTS = ("left.jpg", "right.jpg")
META_MEMBER = re.compile(r"(.*/)?__[^/]*__($|/)")


COUNTS = ("read", "corrupt_samples", "damaged_shards")  # per-source counters of ``DataErrors.by_source``


@dataclass
class DataErrors:
    """Counts and names of everything the pipeline skipped.

    ``samples`` maps ``"<shard url>#<key>"`` to the reason a sample was skipped; ``shards`` maps a shard URL
    to the reason reading it stopped early. Counts are exact; at most ``max_names`` names are kept of each.
    ``by_source`` holds per source (named by ``source_of``, a shard URL → source name map) the samples
    read and the samples and shards skipped.
    """

    corrupt_samples: int = 0
    damaged_shards: int = 0
    samples: dict[str, str] = field(default_factory=dict)
    shards: dict[str, str] = field(default_factory=dict)
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    max_names: int = 1000
    source_of: dict[str, str] = field(default_factory=dict, repr=False)

    def _count(self, url: str, counter: str) -> None:
        counts = self.by_source.setdefault(self.source_of.get(url, "shards"), dict.fromkeys(COUNTS, 0))
        counts[counter] += 1

    def sample_read(self, url: str) -> None:
        """Count one sample read from ``url`` (skipped or not)."""
        self._count(url, "read")

    def sample_failed(self, url: str, key: str, reason: str) -> None:
        """Record one skipped sample."""
        self.corrupt_samples += 1
        self._count(url, "corrupt_samples")
        name = f"{url}#{key}"
        if len(self.samples) < self.max_names:
            self.samples[name] = reason
        log.warning("skipping corrupt sample %s: %s", name, reason)

    def shard_failed(self, url: str, reason: str) -> None:
        """Record a shard whose reading stopped early (the samples read before the damage are kept)."""
        self.damaged_shards += 1
        self._count(url, "damaged_shards")
        if len(self.shards) < self.max_names:
            self.shards[url] = reason
        log.warning("shard %s is damaged, carrying on with the next shard: %s", url, reason)

    def merge(self, other: "DataErrors") -> None:
        """Add another counter's counts and names to this one."""
        self.corrupt_samples += other.corrupt_samples
        self.damaged_shards += other.damaged_shards
        for name, reason in other.samples.items():
            if len(self.samples) < self.max_names:
                self.samples[name] = reason
        for url, reason in other.shards.items():
            if len(self.shards) < self.max_names:
                self.shards[url] = reason
        for source, counts in other.by_source.items():
            mine = self.by_source.setdefault(source, dict.fromkeys(COUNTS, 0))
            for counter in COUNTS:
                mine[counter] += counts.get(counter, 0)

    def take(self) -> dict[str, Any]:
        """Plain-data form of what was recorded so far, then start counting from zero again (in place)."""
        state = self.state_dict()
        self.corrupt_samples, self.damaged_shards, self.samples, self.shards = 0, 0, {}, {}
        self.by_source = {}
        return state

    def state_dict(self) -> dict[str, Any]:
        """Plain-data form (for checkpoints and logs)."""
        return {"corrupt_samples": self.corrupt_samples, "damaged_shards": self.damaged_shards,
                "samples": dict(self.samples), "shards": dict(self.shards),
                "by_source": {name: dict(counts) for name, counts in self.by_source.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts and names saved by ``state_dict``."""
        self.corrupt_samples = int(state["corrupt_samples"])
        self.damaged_shards = int(state["damaged_shards"])
        self.samples = dict(state["samples"])
        self.shards = dict(state["shards"])
        self.by_source = {name: dict(counts) for name, counts in state.get("by_source", {}).items()}


def expand_urls(urls: str | Iterable[str]) -> list[str]:
    """Expand shard patterns: braces (``{000..009}``), ``::``-joined patterns, or shell globs of local files."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    expanded = []
    for url in (u for pattern in patterns for u in wds.shardlists.expand_urls(pattern)):
        expanded.extend(sorted(glob.glob(url)) if glob.has_magic(url) else [url])
    return expanded


class _EndTrackingReader:
    """Pass-through reader that notes how many bytes were read and where the last non-zero byte was."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.total = 0
        self.last_nonzero = -1

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        content = len(data.rstrip(b"\0"))
        if content:
            self.last_nonzero = self.total + content - 1
        self.total += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _shard_members(url: str, errors: DataErrors) -> Iterator[dict[str, Any]]:
    """The member files of one tar, stopping (and recording why) at the first sign of damage.

    Python's streaming tar reader stops quietly when a tar is cut at a header boundary, so the end of the
    archive is checked explicitly: the last member must be followed by the two zero blocks of a complete tar.
    """
    try:
        with wds.gopen(url, "rb") as stream:
            reader = _EndTrackingReader(stream)
            end = 0
            with tarfile.open(fileobj=reader, mode="r|*") as tar:
                for info in tar:
                    end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    if info.isreg() and not META_MEMBER.match(info.name):
                        data = tar.extractfile(info).read()
                        yield {"fname": info.name, "data": data, "__url__": url}
                    tar.members = []
            reader.drain()
            if reader.last_nonzero >= end or reader.total - end < 2 * tarfile.BLOCKSIZE:
                raise EOFError(f"tar ends after {reader.total} bytes without its end-of-archive blocks (truncated)")
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        errors.shard_failed(url, f"damaged or truncated tar ({type(err).__name__}: {err})")


def read_raw(url: str, errors: DataErrors) -> Iterator[dict[str, Any]]:
    """Undecoded samples (``__key__``, ``__url__`` and one bytes entry per member extension) of one shard."""
    yield from wds.tariterators.group_by_keys(_shard_members(url, errors))


@dataclass(frozen=True)
class ImageLimits:
    """Images beyond these are skipped as corrupt before their pixels are decoded (``data.max_image_pixels``,
    ``data.max_image_aspect``): a decompression bomb or a 20000×3 strip is not a training image."""

    max_pixels: int = 40_000_000
    max_aspect: float = 20.0

    def check(self, width: int, height: int) -> None:
        """Raise ``ValueError`` naming the limit when a ``width``×``height`` image exceeds it."""
        if width < 1 or height < 1:
            raise ValueError(f"image has no pixels ({width}x{height})")
        if width * height > self.max_pixels:
            raise ValueError(f"image is {width}x{height} = {width * height} pixels, above max_image_pixels="
                             f"{self.max_pixels} (raise data.max_image_pixels to keep such images)")
        if max(width / height, height / width) > self.max_aspect:
            raise ValueError(f"image is {width}x{height}, an aspect ratio above max_image_aspect={self.max_aspect:g} "
                             "(raise data.max_image_aspect to keep such images)")


def decode_sample(raw: dict[str, Any], limits: ImageLimits = ImageLimits()) -> Sample:
    """Turn an undecoded shard sample into a ``Sample`` with RGB PIL images (a video's bytes as they are); raises
    ``ValueError`` if corrupt or an image exceeds ``limits``."""
    if "json" not in raw:
        raise ValueError(f"no .json member (members: {sorted(k for k in raw if not k.startswith('__'))})")
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"bad .json: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"bad .json: expected an object, got {type(meta).__name__}")
    images: dict[str, Any] = {}
    if all(ext in raw for ext in PAIR_EXTS):
        images["images"] = [_decode_image(raw[ext], ext, limits) for ext in PAIR_EXTS]
    elif (video := next((e for e in VIDEO_EXTS if e in raw), None)) is not None:
        images["video"] = raw[video]
    else:
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is not None:
            images["image"] = _decode_image(raw[ext], ext, limits)
    try:
        return Sample.from_meta(meta, **images)
    except TypeError as err:
        raise ValueError(f"bad .json fields: {err}") from err


def _decode_image(data: bytes, ext: str, limits: ImageLimits) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            limits.check(*img.size)
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"bad .{ext} image: {type(err).__name__}: {err}") from err


def iter_samples(urls: str | list[str], errors: DataErrors | None = None,
                 limits: ImageLimits = ImageLimits()) -> Iterator[Sample]:
    """Every readable sample of the shards ``urls`` (brace patterns allowed), in order, images decoded.

    Corrupt samples and the unreadable tail of a damaged shard are skipped, logged and recorded in
    ``errors`` (pass your own ``DataErrors`` to inspect them afterwards).
    """
    errors = errors if errors is not None else DataErrors()
    for url in expand_urls(urls):
        for raw in read_raw(url, errors):
            try:
                yield decode_sample(raw, limits)
            except ValueError as err:
                errors.sample_failed(raw["__url__"], raw["__key__"], str(err))
