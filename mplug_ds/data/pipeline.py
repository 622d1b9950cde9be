"""Streaming WebDataset pipelines: read shards, mix sources, resample, decode, augment, tokenize, collate.

Shards follow the layout in ``mplug_ds.data.sample`` (``<key>.jpg`` or ``<key>.left.jpg``/``<key>.right.jpg``
plus ``<key>.json``). Damaged input never stops a run: an undecodable image, a bad ``.json`` or a truncated
tar is skipped, logged, counted and named in a ``DataErrors`` object.
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import math
import random
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.utils.data
import webdataset as wds
from PIL import Image

from mplug_ds.data.sample import Sample, Task
from mplug_ds.data.tokenizer import get_tokenizer
from mplug_ds.data.transforms import (box_area, box_to_patch_labels, grounding_transform, image_transform,
                                      pre_caption, pre_question, region_transform, swap_left_right)
from mplug_ds.distributed import get_rank, get_world_size

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PAIR_EXTS = ("left.jpg", "right.jpg")
META_MEMBER = re.compile(r"(.*/)?__[^/]*__($|/)")


# --------------------------------------------------------------------------------------------------
# Damaged input accounting
# --------------------------------------------------------------------------------------------------
@dataclass
class DataErrors:
    """Counts and names of everything the pipeline skipped.

    ``samples`` maps ``"<shard url>#<key>"`` to the reason a sample was skipped; ``shards`` maps a shard URL
    to the reason reading it stopped early. Counts are exact; at most ``max_names`` names are kept of each.
    """

    corrupt_samples: int = 0
    damaged_shards: int = 0
    samples: dict[str, str] = field(default_factory=dict)
    shards: dict[str, str] = field(default_factory=dict)
    max_names: int = 1000

    def sample_failed(self, url: str, key: str, reason: str) -> None:
        """Record one skipped sample."""
        self.corrupt_samples += 1
        name = f"{url}#{key}"
        if len(self.samples) < self.max_names:
            self.samples[name] = reason
        log.warning("skipping corrupt sample %s: %s", name, reason)

    def shard_failed(self, url: str, reason: str) -> None:
        """Record a shard whose reading stopped early (the samples read before the damage are kept)."""
        self.damaged_shards += 1
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

    def take(self) -> dict[str, Any]:
        """Plain-data form of what was recorded so far, then start counting from zero again (in place)."""
        state = self.state_dict()
        self.corrupt_samples, self.damaged_shards, self.samples, self.shards = 0, 0, {}, {}
        return state

    def state_dict(self) -> dict[str, Any]:
        """Plain-data form (for checkpoints and logs)."""
        return {"corrupt_samples": self.corrupt_samples, "damaged_shards": self.damaged_shards,
                "samples": dict(self.samples), "shards": dict(self.shards)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts and names saved by ``state_dict``."""
        self.corrupt_samples = int(state["corrupt_samples"])
        self.damaged_shards = int(state["damaged_shards"])
        self.samples = dict(state["samples"])
        self.shards = dict(state["shards"])


# --------------------------------------------------------------------------------------------------
# Reading shards
# --------------------------------------------------------------------------------------------------
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


def decode_sample(raw: dict[str, Any]) -> Sample:
    """Turn an undecoded shard sample into a ``Sample`` with RGB PIL images; raises ``ValueError`` if corrupt."""
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
        images["images"] = [_decode_image(raw[ext], ext) for ext in PAIR_EXTS]
    else:
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is not None:
            images["image"] = _decode_image(raw[ext], ext)
    try:
        return Sample.from_meta(meta, **images)
    except TypeError as err:
        raise ValueError(f"bad .json fields: {err}") from err


def _decode_image(data: bytes, ext: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"bad .{ext} image: {type(err).__name__}: {err}") from err


def iter_samples(urls: str | list[str], errors: DataErrors | None = None) -> Iterator[Sample]:
    """Every readable sample of the shards ``urls`` (brace patterns allowed), in order, images decoded.

    Corrupt samples and the unreadable tail of a damaged shard are skipped, logged and recorded in
    ``errors`` (pass your own ``DataErrors`` to inspect them afterwards).
    """
    errors = errors if errors is not None else DataErrors()
    for url in expand_urls(urls):
        for raw in read_raw(url, errors):
            try:
                yield decode_sample(raw)
            except ValueError as err:
                errors.sample_failed(raw["__url__"], raw["__key__"], str(err))


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class SourceConfig:
    """One shard set: a brace URL pattern, its mixing weight and an optional manifest with sample counts."""

    name: str
    shards: str
    weight: float = 1.0
    manifest: str | None = None


@dataclass
class DataConfig:
    """A training or evaluation stream (the ``data`` block of a pre-training or task config).

    ``resampled`` streams draw shards with replacement and mix sources per sample by ``weight``; an epoch is
    ``epoch_samples`` samples over all ranks (default: the manifests' total). Non-resampled streams read every
    shard of every source once per epoch, split by rank then by worker (weights are not used).
    """

    sources: list[SourceConfig] = field(default_factory=list)
    task: Task = "caption"
    train: bool = True
    resampled: bool = True
    batch_size: int = 64
    num_workers: int = 4
    seed: int = 42
    image_res: int = 256
    patch_size: int = 16
    scale_min: float = 0.2  # RandomResizedCrop lower scale: 0.2 pre-training, 0.5 fine-tuning
    max_len: int = 30  # text tokens including [CLS] and [SEP]
    max_words: int = 30
    answer_max_len: int = 10
    max_regions: int = 5
    min_region_inside: float = 0.5
    careful_flip: bool = False  # swap 'left'/'right' in region texts when the crop is flipped
    shard_shuffle: bool = True
    shuffle_buffer: int = 1000
    shuffle_initial: int = 100
    epoch_samples: int | None = None
    drop_last: bool = True


# --------------------------------------------------------------------------------------------------
# Manifests and epoch sizes
# --------------------------------------------------------------------------------------------------
_COUNT_KEYS = ("samples", "num_samples", "count", "n")
_NAME_KEYS = ("name", "path", "url", "file", "shard")


def read_manifest(path: str | Path) -> dict[str, int]:
    """Per-shard sample counts by shard file name, from ``{"shards": [{"name", "samples"}, ...]}`` or
    ``{"<file>.tar": count}`` (OpenCLIP ``sizes.json``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the shard manifest ({err}); rewrite it with tools/make_shards.py") from err
    entries = data.get("shards") if isinstance(data, dict) else None
    if entries is None and isinstance(data, dict):
        return {Path(k).name: int(v) for k, v in data.items() if isinstance(v, int)}
    counts = {}
    for i, entry in enumerate(entries or []):
        name = next((entry[k] for k in _NAME_KEYS if k in entry), None)
        count = next((entry[k] for k in _COUNT_KEYS if k in entry), None)
        if name is None or not isinstance(count, int):
            raise ValueError(f"{path}: shards[{i}] needs a name ({'/'.join(_NAME_KEYS)}) and an integer sample "
                             f"count ({'/'.join(_COUNT_KEYS)}); got {entry!r}")
        counts[Path(name).name] = count
    return counts


def source_size(source: SourceConfig) -> int:
    """Number of samples in a source's shards according to its manifest."""
    if source.manifest is None:
        raise ValueError(f"source '{source.name}' has no manifest: set data.sources[].manifest to its "
                         "manifest.json, or set data.epoch_samples")
    counts = read_manifest(source.manifest)
    missing = [u for u in expand_urls(source.shards) if Path(u).name not in counts]
    if missing:
        raise ValueError(f"{source.manifest}: no sample count for shard {missing[0]} of source '{source.name}'; "
                         "regenerate the manifest or fix data.sources[].shards")
    return sum(counts[Path(u).name] for u in expand_urls(source.shards))


# --------------------------------------------------------------------------------------------------
# Per-sample preparation (augment, pick text) and batch collation (tokenize, stack)
# --------------------------------------------------------------------------------------------------
def split_prefix(words: list[str], rng: random.Random) -> tuple[str, str]:
    """Prefix-LM split at s ~ U{0..n−1}: (words[:s], words[s:] + " [SEP]") as strings."""
    s = rng.randint(0, len(words) - 1)
    return " ".join(words[:s]), " ".join(words[s:]) + " [SEP]"


def _caption_words(sample: Sample, cfg: DataConfig, rng: random.Random) -> list[str]:
    texts = [t for t in sample.texts if pre_caption(t, cfg.max_words)]
    if not texts:
        raise ValueError("no non-empty caption in texts")
    return pre_caption(rng.choice(texts), cfg.max_words).split()


def _image(sample: Sample) -> Image.Image:
    if not isinstance(sample.image, Image.Image):
        raise ValueError("no image member (.jpg)")
    return sample.image


class Preparer:
    """Turns one decoded ``Sample`` into the un-tokenised item of ``cfg.task`` using an explicit rng."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.transform = image_transform(cfg.image_res, cfg.train, cfg.scale_min)

    def __call__(self, sample: Sample, rng: random.Random) -> dict[str, Any]:
        return getattr(self, f"_{self.cfg.task}")(sample, rng)

    def _caption(self, sample: Sample, rng: random.Random) -> dict[str, Any]:
        words = _caption_words(sample, self.cfg, rng)
        prefix, target = split_prefix(words, rng)
        return {"key": sample.key, "image": self.transform(_image(sample), rng), "text": " ".join(words),
                "prefix": prefix, "target": target}

    def _region(self, sample: Sample, rng: random.Random) -> dict[str, Any]:
        img, cfg = _image(sample), self.cfg
        boxes = [[max(0.0, b[0]), max(0.0, b[1]), min(float(img.width), b[2]), min(float(img.height), b[3])]
                 for b in sample.boxes]
        usable = [i for i, (b, t) in enumerate(zip(boxes, sample.texts))
                  if box_area(b) > 0 and pre_caption(t, cfg.max_words)]
        if not usable:
            raise ValueError("no region with a non-empty box inside the image and a non-empty text")
        tensor, kept, moved, flipped = region_transform(img, [boxes[i] for i in usable], rng.randrange(len(usable)),
                                                        cfg.image_res, rng, cfg.min_region_inside)
        order = rng.sample(range(len(kept)), len(kept))[: cfg.max_regions]
        texts, labels = [], []
        for j in order:
            text = pre_caption(sample.texts[usable[kept[j]]], cfg.max_words)
            texts.append(swap_left_right(text) if flipped and cfg.careful_flip else text)
            labels.append(box_to_patch_labels(moved[j], cfg.image_res, cfg.patch_size))
        return {"key": sample.key, "image": tensor, "texts": texts, "patch_labels": labels}

    def _vqa(self, sample: Sample, rng: random.Random) -> dict[str, Any]:
        if not sample.texts:
            raise ValueError("no question in texts")
        if self.cfg.train and not sample.answers:
            raise ValueError("training VQA sample without answers")
        weights = sample.answer_weights or [1.0 / len(sample.answers)] * len(sample.answers)
        return {"key": sample.key, "image": self.transform(_image(sample), rng),
                "question": pre_question(sample.texts[0], self.cfg.max_words),
                "answers": list(sample.answers), "weights": list(weights),
                "question_id": sample.extra.get("question_id", sample.key)}

    def _grounding(self, sample: Sample, rng: random.Random) -> dict[str, Any]:
        if not sample.texts or not sample.boxes:
            raise ValueError("grounding sample needs texts[0] (expression) and boxes[0]")
        image, box, text = grounding_transform(_image(sample), sample.boxes[0], sample.texts[0],
                                               self.cfg.image_res, self.cfg.train, rng)
        return {"key": sample.key, "image": image, "box": box, "text": pre_caption(text, self.cfg.max_words)}

    def _nlvr2(self, sample: Sample, rng: random.Random) -> dict[str, Any]:
        if len(sample.images) != 2 or not sample.texts or sample.label is None:
            raise ValueError("nlvr2 sample needs .left.jpg/.right.jpg, texts[0] and label")
        left, right = sample.images
        text = sample.texts[0]
        if self.cfg.train and rng.random() < 0.5:  # swapping the pair mirrors the scene: swap the words too
            left, right, text = right, left, swap_left_right(text)
        return {"key": sample.key, "image0": self.transform(left, rng), "image1": self.transform(right, rng),
                "text": pre_caption(text, self.cfg.max_words), "label": int(sample.label)}

    def _ve(self, sample: Sample, rng: random.Random) -> dict[str, Any]:
        if not sample.texts or sample.label is None:
            raise ValueError("ve sample needs texts[0] (hypothesis) and label")
        return {"key": sample.key, "image": self.transform(_image(sample), rng),
                "text": pre_caption(sample.texts[0], self.cfg.max_words), "label": int(sample.label)}


def tokenize(texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] … [SEP]`` ids and attention mask, (len(texts), max_len) long, padded with [PAD]."""
    enc = get_tokenizer()(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def collate_caption(items: list[dict[str, Any]], max_len: int = 30) -> dict[str, Any]:
    """Pre-training batch: image, text_ids/mask, prefix_ids/mask, target_ids/mask (prefix-LM split)."""
    batch: dict[str, Any] = {"keys": [it["key"] for it in items], "image": torch.stack([it["image"] for it in items])}
    for name, field_name in (("text", "text"), ("prefix", "prefix"), ("target", "target")):
        batch[f"{name}_ids"], batch[f"{name}_mask"] = tokenize([it[field_name] for it in items], max_len)
    return batch


def collate_region(items: list[dict[str, Any]], max_len: int = 30) -> dict[str, Any]:
    """Patch-text alignment batch: images (B,…), one row per region text: ids/mask (P,L), patch_labels (P,grid²),
    region_image_index (P,) pointing into the images."""
    texts = [t for it in items for t in it["texts"]]
    ids, mask = tokenize(texts, max_len)
    return {"keys": [it["key"] for it in items], "image": torch.stack([it["image"] for it in items]),
            "region_text_ids": ids, "region_text_mask": mask,
            "patch_labels": torch.stack([lab for it in items for lab in it["patch_labels"]]),
            "region_image_index": torch.tensor([i for i, it in enumerate(items) for _ in it["texts"]])}


def collate_vqa(items: list[dict[str, Any]], max_len: int = 30, answer_max_len: int = 10) -> dict[str, Any]:
    """VQA batch: question ids/mask (B,L); answers flattened as ``answer [SEP]`` ids/mask (A,La) with
    answer_weights (A,) and answer_counts (B,) (answers per question); raw answers and question ids kept."""
    batch: dict[str, Any] = {"keys": [it["key"] for it in items], "image": torch.stack([it["image"] for it in items]),
                             "question_id": [it["question_id"] for it in items],
                             "answers": [it["answers"] for it in items]}
    batch["question_ids"], batch["question_mask"] = tokenize([it["question"] for it in items], max_len)
    answers = [a for it in items for a in it["answers"]]
    if answers:
        batch["answer_ids"], batch["answer_mask"] = tokenize([f"{a} [SEP]" for a in answers], answer_max_len)
        batch["answer_weights"] = torch.tensor([w for it in items for w in it["weights"]], dtype=torch.float32)
        batch["answer_counts"] = torch.tensor([len(it["answers"]) for it in items])
    return batch


def collate_grounding(items: list[dict[str, Any]], max_len: int = 30) -> dict[str, Any]:
    """Grounding batch: padded image, text ids/mask, box (B,4) normalised (cx, cy, w, h)."""
    ids, mask = tokenize([it["text"] for it in items], max_len)
    return {"keys": [it["key"] for it in items], "image": torch.stack([it["image"] for it in items]),
            "text_ids": ids, "text_mask": mask, "box": torch.stack([it["box"] for it in items])}


def collate_nlvr2(items: list[dict[str, Any]], max_len: int = 30) -> dict[str, Any]:
    """NLVR2 batch: image0, image1 (B,3,R,R), text ids/mask, label (B,)."""
    ids, mask = tokenize([it["text"] for it in items], max_len)
    return {"keys": [it["key"] for it in items], "image0": torch.stack([it["image0"] for it in items]),
            "image1": torch.stack([it["image1"] for it in items]), "text_ids": ids, "text_mask": mask,
            "label": torch.tensor([it["label"] for it in items])}


def collate_ve(items: list[dict[str, Any]], max_len: int = 30) -> dict[str, Any]:
    """SNLI-VE batch: image, hypothesis ids/mask, label (B,) (0 contradiction, 1 neutral, 2 entailment)."""
    ids, mask = tokenize([it["text"] for it in items], max_len)
    return {"keys": [it["key"] for it in items], "image": torch.stack([it["image"] for it in items]),
            "text_ids": ids, "text_mask": mask, "label": torch.tensor([it["label"] for it in items])}


def collate(items: list[dict[str, Any]], cfg: DataConfig) -> dict[str, Any]:
    """The collate function of ``cfg.task``."""
    if cfg.task == "vqa":
        return collate_vqa(items, cfg.max_len, cfg.answer_max_len)
    collate_fn = {"caption": collate_caption, "region": collate_region, "grounding": collate_grounding,
                  "nlvr2": collate_nlvr2, "ve": collate_ve}[cfg.task]
    return collate_fn(items, cfg.max_len)


# --------------------------------------------------------------------------------------------------
# The per-worker stream
# --------------------------------------------------------------------------------------------------
@dataclass
class StreamPosition:
    """How far one logical worker of one rank got in the current epoch."""

    raw: int = 0  # undecoded samples consumed after shuffling (corrupt ones included)
    batches: int = 0  # batches produced


def _rng(*parts: Any) -> random.Random:
    """A generator seeded from a tuple of values, identical in every process."""
    return random.Random("/".join(map(str, parts)))


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of one rank for one epoch, produced by DataLoader workers.

    All randomness comes from (seed, epoch, rank, logical worker, sample position), so a worker told to start
    at ``positions[w]`` skips that many undecoded samples and then produces exactly what it would have produced
    without the interruption. DataLoader worker ``j`` plays logical worker ``(j + worker_offset) % W``, which
    lets a restored loader continue the round-robin order of the interrupted one.
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, epoch: int, positions: list[StreamPosition],
                 worker_offset: int = 0, batches_per_worker: int | None = None) -> None:
        super().__init__()
        self.cfg, self.rank, self.world_size, self.epoch = cfg, rank, world_size, epoch
        self.positions, self.worker_offset, self.batches_per_worker = positions, worker_offset, batches_per_worker

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (physical + self.worker_offset) % num_workers
        start = self.positions[worker]
        cfg, errors, prepare = self.cfg, DataErrors(), Preparer(self.cfg)
        limit = self.batches_per_worker
        raw_count, batches, items = start.raw, start.batches, []
        if limit is not None and batches >= limit:
            return
        stream = self._raw_stream(worker, num_workers, errors)
        if cfg.train and cfg.shuffle_buffer > 1:
            rng = _rng("buffer", cfg.seed, self.epoch, self.rank, worker)
            stream = wds.shuffle(cfg.shuffle_buffer, cfg.shuffle_initial, rng=rng)(stream)
        for raw in itertools.islice(stream, start.raw, None):
            raw_count += 1
            try:
                items.append(prepare(decode_sample(raw), _rng("sample", cfg.seed, self.epoch, self.rank, worker,
                                                              raw_count)))
            except ValueError as err:
                errors.sample_failed(raw["__url__"], raw["__key__"], str(err))
            if len(items) == cfg.batch_size:
                batches += 1
                yield self._emit(collate(items, cfg), worker, raw_count, batches, errors)
                items = []
                if limit is not None and batches >= limit:
                    return
        if items and not cfg.drop_last:
            yield self._emit(collate(items, cfg), worker, raw_count, batches + 1, errors)
        elif errors.corrupt_samples or errors.damaged_shards:
            yield self._emit({}, worker, raw_count, batches, errors)

    @staticmethod
    def _emit(batch: dict[str, Any], worker: int, raw: int, batches: int, errors: DataErrors) -> dict[str, Any]:
        batch["__stream__"] = {"worker": worker, "raw": raw, "batches": batches, "errors": errors.take()}
        return batch

    def _raw_stream(self, worker: int, num_workers: int, errors: DataErrors) -> Iterator[dict[str, Any]]:
        if self.cfg.resampled:
            return self._mixed(worker, errors)
        return self._split(worker, num_workers, errors)

    def _split(self, worker: int, num_workers: int, errors: DataErrors) -> Iterator[dict[str, Any]]:
        for url in split_shards(self.cfg, self.epoch, self.rank, self.world_size, worker, num_workers):
            yield from read_raw(url, errors)

    def _mixed(self, worker: int, errors: DataErrors) -> Iterator[dict[str, Any]]:
        sources = self.cfg.sources
        streams = [self._resampled_source(src, worker, errors) for src in sources]
        rng = _rng("mix", self.cfg.seed, self.epoch, self.rank, worker)
        indices, weights = range(len(sources)), [src.weight for src in sources]
        while True:
            yield next(streams[rng.choices(indices, weights)[0]])

    def _resampled_source(self, src: SourceConfig, worker: int, errors: DataErrors) -> Iterator[dict[str, Any]]:
        urls = expand_urls(src.shards)
        rng = _rng("shards", src.name, self.cfg.seed, self.epoch, self.rank, worker)
        empty_in_a_row = 0
        while True:
            url = rng.choice(urls)
            found = False
            for raw in read_raw(url, errors):
                found = True
                yield raw
            empty_in_a_row = 0 if found else empty_in_a_row + 1
            if empty_in_a_row >= max(16, 2 * len(urls)):
                raise RuntimeError(f"source '{src.name}': {empty_in_a_row} shards in a row held no readable sample "
                                   f"({src.shards}); check data.sources[].shards and the shard files")


def split_shards(cfg: DataConfig, epoch: int, rank: int, world_size: int, worker: int,
                 num_workers: int) -> list[str]:
    """The shards one worker of one rank reads in a non-resampled epoch: every source's shards, shuffled by
    (seed, epoch) identically on all ranks when training, then taken by rank and by worker."""
    urls = [url for src in cfg.sources for url in expand_urls(src.shards)]
    if cfg.train and cfg.shard_shuffle:
        _rng("order", cfg.seed, epoch).shuffle(urls)
    return urls[rank::world_size][worker::num_workers]


# --------------------------------------------------------------------------------------------------
# The loader the trainer iterates
# --------------------------------------------------------------------------------------------------
class ShardLoader:
    """Batches of one rank, epoch after epoch, with a position a checkpoint can save and restore exactly.

    Iterating yields the rest of the current epoch and then moves to the next; breaking off keeps the
    position, so the next iteration continues where the consumer stopped. ``errors`` accumulates what the
    workers skipped.
    """

    def __init__(self, cfg: DataConfig, rank: int | None = None, world_size: int | None = None) -> None:
        check_config(cfg)
        self.cfg = cfg
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self.num_workers = max(1, cfg.num_workers)
        self.errors = DataErrors()
        self.epoch = 0
        self._reset_position()
        if not cfg.resampled:
            shards = sum(len(expand_urls(s.shards)) for s in cfg.sources)
            if shards < self.world_size * self.num_workers:
                raise ValueError(f"{shards} shards cannot feed {self.world_size} ranks × {self.num_workers} workers: "
                                 "write more, smaller shards (tools/make_shards.py) or lower data.num_workers")

    def _reset_position(self) -> None:
        self.received = 0
        self.batches = 0
        self.positions = [StreamPosition() for _ in range(self.num_workers)]

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning at the next iteration."""
        self.epoch = epoch
        self._reset_position()

    def batches_per_worker(self) -> int | None:
        """Resampled mode: batches each worker produces per epoch (equal for all, so ranks stay in step)."""
        if not self.cfg.resampled:
            return None
        samples = self.cfg.epoch_samples
        if samples is None:
            samples = sum(source_size(src) for src in self.cfg.sources)
        global_batch = self.cfg.batch_size * self.world_size
        return math.ceil(math.ceil(samples / global_batch) / self.num_workers)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (non-resampled: from the manifests, before corrupt samples;
        ``TypeError`` without manifests, so ``list(loader)`` still works)."""
        per_worker = self.batches_per_worker()
        if per_worker is not None:
            return per_worker * self.num_workers
        counts: dict[str, int] = {}
        for src in self.cfg.sources:
            if src.manifest is None:
                raise TypeError(f"the length of a non-resampled stream needs manifests; source '{src.name}' has none")
            source_size(src)  # validates the manifest covers every shard
            counts |= read_manifest(src.manifest)
        total = 0
        for worker in range(self.num_workers):
            n = sum(counts[Path(u).name] for u in split_shards(self.cfg, self.epoch, self.rank, self.world_size,
                                                                 worker, self.num_workers))
            total += n // self.cfg.batch_size if self.cfg.drop_last else math.ceil(n / self.cfg.batch_size)
        return total

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = ShardStream(self.cfg, self.rank, self.world_size, self.epoch, list(self.positions),
                             worker_offset=self.received % self.num_workers,
                             batches_per_worker=self.batches_per_worker())
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers)
        for batch in loader:
            meta = batch.pop("__stream__")
            self.received += 1
            self.positions[meta["worker"]] = StreamPosition(meta["raw"], meta["batches"])
            delta = DataErrors()
            delta.load_state_dict(meta["errors"])
            self.errors.merge(delta)
            if batch:
                self.batches += 1
                yield batch
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        """The data position (plain data): restore it with ``load_state_dict`` on a loader of the same config."""
        return {"epoch": self.epoch, "received": self.received, "batches": self.batches,
                "positions": [[p.raw, p.batches] for p in self.positions], "errors": self.errors.state_dict(),
                "num_workers": self.num_workers, "rank": self.rank, "world_size": self.world_size,
                "seed": self.cfg.seed, "resampled": self.cfg.resampled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by ``state_dict``; the run layout must match the saved one."""
        for name, mine in (("num_workers", self.num_workers), ("world_size", self.world_size), ("rank", self.rank),
                           ("seed", self.cfg.seed), ("resampled", self.cfg.resampled)):
            if state[name] != mine:
                raise ValueError(f"data position was saved with {name}={state[name]!r} but this loader has "
                                 f"{name}={mine!r}; resume with the same data.{name} / world size")
        self.epoch, self.received, self.batches = state["epoch"], state["received"], state["batches"]
        self.positions = [StreamPosition(raw, batches) for raw, batches in state["positions"]]
        self.errors = DataErrors()
        self.errors.load_state_dict(state["errors"])


def check_config(cfg: DataConfig) -> None:
    """Reject a data config that cannot work, naming the key and the fix."""
    if not cfg.sources:
        raise ValueError("data.sources is empty: list at least one {name, shards} source")
    for i, src in enumerate(cfg.sources):
        if not expand_urls(src.shards):
            raise ValueError(f"data.sources[{i}].shards ('{src.shards}') expands to no shard")
        if src.weight <= 0:
            raise ValueError(f"data.sources[{i}].weight must be > 0, got {src.weight}")
    if cfg.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.image_res % cfg.patch_size:
        raise ValueError(f"data.image_res ({cfg.image_res}) must be a multiple of data.patch_size ({cfg.patch_size})")


def build_loader(cfg: DataConfig, rank: int | None = None, world_size: int | None = None) -> ShardLoader:
    """The loader for ``cfg`` on this rank (rank/world size default to torch.distributed's)."""
    return ShardLoader(cfg, rank, world_size)
