"""Writing canonical samples to WebDataset shards: atomically, resumably, with a manifest and a skipped report.

Output directory after a run:
  ``<prefix>-000000.tar`` …       shards in the layout of ``mplug_ds.data.sample`` (``<key>.jpg`` + ``<key>.json``)
  ``manifest.json``               format, task, shard names with sample counts, totals, skipped count, tool version
  ``skipped.jsonl``               one ``{"source", "key", "reason"}`` line per rejected input
  ``<prefix>.progress.jsonl``     one line per finished shard (what a rerun uses to resume)

Shard membership is decided from the ordered sample stream alone: shard ``k`` holds the valid samples among stream
positions ``[k*shard_size, (k+1)*shard_size)``. A rerun with the same inputs and options therefore reproduces the
same shards, and any shard whose file exists and whose fingerprint (sample metadata, options, and each image's
path, size and modification time) matches its progress record is kept as is instead of being rewritten. Every file is written under a temporary
name and renamed into place, so a crash never leaves a half-written shard under a final name.

Per sample, before writing: texts are stripped and empty ones dropped (a caption sample keeps its other
captions; a region pair loses its box too, a video question its answer); each image is read and fully decoded
(missing, unreadable or corrupt → skipped); boxes are clipped to the image and a box with no area left is dropped
(region) or rejects the sample (grounding); images are stored as their original JPEG bytes unless ``resize`` shrinks
them or they are not JPEG, in which case they are re-encoded (and boxes scaled to match). A video is read and every
frame decoded (missing, unreadable, truncated, without frames or of a codec FFmpeg cannot decode → skipped); it is
stored as the file's bytes under the file's container extension, or re-encoded to H.264 MP4 when ``resize`` shrinks
it, when its suffix is no known container (``sample.VIDEO_EXTS``) or when it came as bytes without a file name.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

import mplug_ds
from mplug_ds.data.formats.common import Skip
from mplug_ds.data.sample import VIDEO_EXTS, Sample
from mplug_ds.data.video import PyAVDecoder, VideoInfo, reencode
from mplug_ds.runtime.atomic import atomic_path, atomic_write_text

_WRITER_VERSION = 1  # part of every shard fingerprint: bump when the stored bytes of a sample change


@dataclass
class ShardOptions:
    """Where and how to write shards."""

    out: Path
    prefix: str
    format_name: str
    shard_size: int = 1000
    resize: int | None = None  # longest image (or video frame) side after resizing (only ever shrunk)
    workers: int = 0  # image-loading processes; 0 = load in this process
    jpeg_quality: int = 90
    inputs: list[str] = field(default_factory=list)  # annotation files, recorded in the manifest
    progress: bool = True  # print a progress line to stderr


@dataclass
class _Prepared:
    sample: Sample | None
    skips: list[Skip]


# --------------------------------------------------------------------------------------------------
# Per-sample checks and image preparation (runs in worker processes)
# --------------------------------------------------------------------------------------------------
def prepare_sample(sample: Sample, resize: int | None = None, jpeg_quality: int = 90) -> _Prepared:
    """Check texts, load and check images (or the video), clip boxes; return the sample with its image (video)
    bytes, or why not."""
    skips: list[Skip] = []
    refs = _refs(sample)
    source = _source(refs)
    try:
        _check_texts(sample, source, skips)
        if sample.video is not None:
            sample.video, info = _load_video(sample.video, resize)
            sample.extra["video"] = info
            return _Prepared(sample, skips)
        encoded = [_load_image(ref) for ref in refs]
    except _Rejected as reason:
        return _Prepared(None, [*skips, Skip(source, sample.key, str(reason))])
    (width, height), scale = encoded[0][1], 1.0
    if resize and max(width, height) > resize:
        scale = resize / max(width, height)
    try:
        _check_boxes(sample, width, height, source, skips)
    except _Rejected as reason:
        return _Prepared(None, [*skips, Skip(source, sample.key, str(reason))])
    payloads = [_encode(image, size, is_jpeg, data, resize, jpeg_quality)
                for data, size, is_jpeg, image in encoded]
    if scale != 1.0:
        new_w, new_h = _resized_size(width, height, resize)
        sx, sy = new_w / width, new_h / height
        sample.boxes = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in sample.boxes]
    if sample.images:
        sample.images = payloads
    else:
        sample.image = payloads[0]
    return _Prepared(sample, skips)


class _Rejected(Exception):
    """The whole sample is rejected; the message is the reason."""


def _refs(sample: Sample) -> list[Any]:
    """The sample's payload references: its video, its image pair or its image."""
    return [sample.video] if sample.video is not None else sample.images or [sample.image]


def _source(refs: list[Any]) -> str:
    paths = [r for r in refs if isinstance(r, str)]
    return ", ".join(paths) if paths else "(image bytes from the annotation input)"


def _check_texts(sample: Sample, source: str, skips: list[Skip]) -> None:
    texts = [t.strip() if isinstance(t, str) else "" for t in sample.texts]
    if sample.task in ("caption", "video_caption"):
        kept = [t for t in texts if t]
        if len(kept) < len(texts) and kept:
            skips.append(Skip(source, sample.key, f"{len(texts) - len(kept)} empty caption(s) dropped"))
        if not kept:
            raise _Rejected("empty caption" if texts else "no captions")
        sample.texts = kept
    elif sample.task == "region":
        if len(sample.boxes) != len(texts):
            raise _Rejected(f"malformed row: {len(texts)} texts but {len(sample.boxes)} boxes")
        pairs = [(t, b) for t, b in zip(texts, sample.boxes) if t]
        if len(pairs) < len(texts):
            skips.append(Skip(source, sample.key, f"{len(texts) - len(pairs)} region(s) with empty text dropped"))
        if not pairs:
            raise _Rejected("no region with a non-empty text")
        sample.texts, sample.boxes = [t for t, _ in pairs], [b for _, b in pairs]
    elif sample.task == "video_qa":
        _check_questions(sample, texts, source, skips)
    else:
        if not texts or not all(texts):
            raise _Rejected(f"empty text for a {sample.task} sample")
        sample.texts = texts


def _check_questions(sample: Sample, texts: list[str], source: str, skips: list[Skip]) -> None:
    """A video's questions keep their answer, id and type; a question or answer left empty drops that question."""
    answers = [a.strip() if isinstance(a, str) else "" for a in sample.answers]
    if len(answers) != len(texts):
        raise _Rejected(f"malformed row: {len(texts)} questions but {len(answers)} answers")
    keep = [i for i, (q, a) in enumerate(zip(texts, answers)) if q and a]
    if len(keep) < len(texts):
        skips.append(Skip(source, sample.key, f"{len(texts) - len(keep)} question(s) with an empty question or "
                                              "answer dropped"))
    if not keep:
        raise _Rejected("no question with a non-empty answer")
    sample.texts, sample.answers = [texts[i] for i in keep], [answers[i] for i in keep]
    sample.answer_weights = [sample.answer_weights[i] for i in keep] if sample.answer_weights else [1.0] * len(keep)
    for name in ("question_ids", "answer_types"):
        if name in sample.extra:
            sample.extra[name] = [sample.extra[name][i] for i in keep]


def _read_media(ref: Any, kind: str) -> tuple[bytes, str]:
    """(bytes, name for messages) of a sample's image or video, given as a file path or as bytes; or ``_Rejected``."""
    if isinstance(ref, bytes):
        return ref, f"{kind} bytes"
    if not isinstance(ref, str):
        raise _Rejected(f"sample has no {kind}")
    try:
        return Path(ref).read_bytes(), ref
    except FileNotFoundError:
        raise _Rejected(f"missing {kind} file {ref}") from None
    except OSError as err:
        raise _Rejected(f"unreadable {kind} file {ref}: {err}") from None


def _load_video(ref: Any, resize: int | None) -> tuple[bytes, dict[str, Any]]:
    """(the bytes to store, ``extra["video"]``: container extension and what decoding found) or ``_Rejected``."""
    data, name = _read_media(ref, "video")
    ext = Path(ref).suffix.lower().lstrip(".") if isinstance(ref, str) else ""
    try:
        info = PyAVDecoder().probe(data)
        if (resize and max(info.width, info.height) > resize) or ext not in VIDEO_EXTS:
            data, info = reencode(data, resize or max(info.width, info.height))
            ext = "mp4"
    except ValueError as err:
        raise _Rejected(f"corrupt video {name}: {err}") from None
    return data, {"format": ext, **_info(info)}


def _info(info: VideoInfo) -> dict[str, Any]:
    return {"frames": info.frames, "width": info.width, "height": info.height, "fps": round(info.fps, 3),
            "codec": info.codec}


def _load_image(ref: Any) -> tuple[bytes, tuple[int, int], bool, Image.Image]:
    """(original bytes, (width, height), is_jpeg, decoded image) or ``_Rejected``."""
    data, name = _read_media(ref, "image")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _Rejected(f"corrupt image {name}: {type(err).__name__}: {err}") from None
    return data, image.size, image.format == "JPEG", image


def _check_boxes(sample: Sample, width: int, height: int, source: str, skips: list[Skip]) -> None:
    """Clip boxes to the image; drop (region) or reject (grounding) boxes with no area inside it."""
    kept_texts, kept_boxes = [], []
    for index, box in enumerate(sample.boxes):
        x0, y0 = max(0.0, float(box[0])), max(0.0, float(box[1]))
        x1, y1 = min(float(width), float(box[2])), min(float(height), float(box[3]))
        if x1 <= x0 or y1 <= y0:
            reason = f"box {_fmt(box)} is outside the {width}x{height} image or empty"
            if sample.task != "region":
                raise _Rejected(reason)
            skips.append(Skip(source, f"{sample.key}#{index}", f"region dropped: {reason}"))
            continue
        kept_boxes.append([x0, y0, x1, y1])
        if sample.task == "region":
            kept_texts.append(sample.texts[index])
    if sample.task == "region":
        if not kept_boxes:
            raise _Rejected("no region box inside the image")
        sample.texts = kept_texts
    sample.boxes = kept_boxes


def _fmt(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _resized_size(width: int, height: int, resize: int | None) -> tuple[int, int]:
    if not resize or max(width, height) <= resize:
        return width, height
    scale = resize / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _encode(image: Image.Image, size: tuple[int, int], is_jpeg: bool, data: bytes, resize: int | None,
            quality: int) -> bytes:
    new_size = _resized_size(*size, resize)
    if is_jpeg and new_size == size:
        return data
    if image.mode != "RGB":
        image = image.convert("RGB")
    if new_size != size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Shard files
# --------------------------------------------------------------------------------------------------
def shard_members(sample: Sample) -> list[tuple[str, bytes]]:
    """The tar members of one prepared sample, in sorted extension order (as WebDataset's TarWriter writes)."""
    members = {"json": sample.meta_json()}
    if sample.video is not None:
        members[sample.extra["video"]["format"]] = sample.video
    elif sample.images:
        members["left.jpg"], members["right.jpg"] = sample.images
    else:
        members["jpg"] = sample.image
    return [(f"{sample.key}.{ext}", members[ext]) for ext in sorted(members)]


def _write_tar_atomic(path: Path, samples: list[Sample]) -> None:
    with atomic_path(path) as temp, open(temp, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                for name, data in shard_members(sample):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(data), 0o444, 0
                    tar.addfile(info, io.BytesIO(data))


def _fingerprint(batch: list[Sample], options: ShardOptions) -> str:
    """What decides a shard's bytes: options, sample metadata, and each image's bytes or (for a file) its path,
    size and modification time, so fixing or replacing an image file rebuilds its shard on the next run."""
    digest = hashlib.sha256(json.dumps([_WRITER_VERSION, options.resize, options.jpeg_quality]).encode())
    for sample in batch:
        digest.update(sample.meta_json())
        for ref in _refs(sample):
            digest.update(hashlib.sha1(ref).digest() if isinstance(ref, bytes) else _file_identity(ref).encode())
    return digest.hexdigest()


def _file_identity(ref: object) -> str:
    try:
        stat = os.stat(str(ref))
    except OSError:
        return f"{ref}|missing"
    return f"{ref}|{stat.st_size}|{stat.st_mtime_ns}"


def _read_progress(path: Path) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            records[record["shard"]] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a crash: that shard is simply redone
    return records


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def _batches(items: Iterable[Sample | Skip], size: int, reader_skips: list[Skip]) -> Iterator[list[Sample]]:
    """Consecutive runs of ``size`` samples; reader skips and duplicate keys go to ``reader_skips``."""
    seen: set[str] = set()
    batch: list[Sample] = []
    for item in items:
        if isinstance(item, Skip):
            reader_skips.append(item)
            continue
        if item.key in seen:
            reader_skips.append(Skip(_source(_refs(item)), item.key, "duplicate key"))
            continue
        seen.add(item.key)
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled, self.start, self.last, self.images = enabled, time.monotonic(), 0.0, 0

    def update(self, images: int, shard: str, skipped: int, final: bool = False) -> None:
        self.images += images
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < 1.0):
            return
        self.last = now
        rate = self.images / max(now - self.start, 1e-9)
        tty = sys.stderr.isatty()  # redraw one line on a terminal, one line per update in a log file
        print(f"{chr(13) if tty else ''}{shard}: {self.images} images loaded, {rate:.1f} images/s, "
              f"{skipped} skipped", end="\n" if final or not tty else "", file=sys.stderr, flush=True)


def write_shards(items: Iterable[Sample | Skip], options: ShardOptions) -> dict[str, Any]:
    """Write all samples of ``items`` as shards under ``options.out``; return the manifest (also written)."""
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(options.prefix) + r"-(\d{6})\.tar")
    for stale in out.glob(f".{options.prefix}-*.tar.*.tmp"):  # temporaries of a killed run
        stale.unlink(missing_ok=True)
    progress_path = out / f"{options.prefix}.progress.jsonl"
    done = _read_progress(progress_path)
    reader_skips: list[Skip] = []
    shards: list[dict[str, Any]] = []
    tasks: set[str] = set()
    reused = 0
    progress = _Progress(options.progress)
    prepare = partial(prepare_sample, resize=options.resize, jpeg_quality=options.jpeg_quality)
    pool = multiprocessing.Pool(options.workers) if options.workers > 0 else None
    try:
        for index, batch in enumerate(_batches(items, options.shard_size, reader_skips)):
            name = f"{options.prefix}-{index:06d}.tar"
            tasks.update(s.task for s in batch)
            fingerprint = _fingerprint(batch, options)
            record = done.get(name)
            if (record and record.get("fingerprint") == fingerprint
                    and (record.get("samples") == 0 or (out / name).is_file())):
                shards.append(record)
                reused += 1
                continue
            chunk = max(1, len(batch) // (4 * options.workers)) if pool else 1
            results = pool.imap(prepare, batch, chunksize=chunk) if pool else map(prepare, batch)
            kept: list[Sample] = []
            skips: list[Skip] = []
            for result in results:
                skips += result.skips
                if result.sample is not None:
                    kept.append(result.sample)
                progress.update(1, name, len(reader_skips) + len(skips) + sum(len(s["skipped"]) for s in shards))
            if kept:
                _write_tar_atomic(out / name, kept)
            else:
                (out / name).unlink(missing_ok=True)
            record = {"shard": name, "fingerprint": fingerprint, "samples": len(kept),
                      "skipped": [s.as_dict() for s in skips]}
            with open(progress_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            shards.append(record)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    for path in out.glob(f"{options.prefix}-*.tar"):
        found = pattern.fullmatch(path.name)
        if found and int(found.group(1)) >= len(shards):
            path.unlink()  # left over from an earlier run over more samples
    skipped = [s.as_dict() for s in reader_skips] + [s for record in shards for s in record["skipped"]]
    manifest = {
        "format": options.format_name,
        "task": sorted(tasks)[0] if len(tasks) == 1 else sorted(tasks),
        "shards": [{"name": r["shard"], "samples": r["samples"]} for r in shards if r["samples"] > 0],
        "total_samples": sum(r["samples"] for r in shards),
        "skipped": len(skipped),
        "inputs": options.inputs,
        "options": {"shard_size": options.shard_size, "resize": options.resize, "jpeg_quality": options.jpeg_quality},
        "tool": "tools/make_shards.py",
        "version": mplug_ds.__version__,
    }
    atomic_write_text(out / "skipped.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped))
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    progress.update(0, f"{len(shards)} shards ({reused} kept from an earlier run)", len(skipped), final=True)
    return manifest
