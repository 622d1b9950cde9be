"""Streaming WebDataset pipelines: mix sources, resample, split by rank and worker, shuffle, and keep a
saveable position; samples are read by ``reading``, prepared and batched by ``collate``.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.utils.data
import webdataset as wds
from PIL import Image

from mplug_ds.data.collate import Preparer, collate
from mplug_ds.data.data_config import DataConfig, SourceConfig, image_limits, read_manifest, source_size
from mplug_ds.data.reading import DataErrors, decode_sample, expand_urls, read_raw
from mplug_ds.distributed import get_rank, get_world_size

log = logging.getLogger(__name__)


@dataclass
class StreamPosition:
    """How far one logical worker of one rank got in the current epoch."""

    raw: int = 0  # undecoded samples consumed after shuffling (corrupt ones included)
    batches: int = 0  # batches produced


@dataclass(frozen=True)
class Lane:
    """What is left of one logical stream of an epoch, read on another number of ranks.

    The stream is the one (rank, world_size, worker, num_workers) of the layout that began the epoch; the lane reads
    its raw positions ``[start, stop)`` (``stop`` ``None``: to its end) and takes every ``stride``-th of them from
    ``offset``. Each sample keeps the augmentation randomness it had in the old layout.
    """

    rank: int
    world_size: int
    worker: int
    num_workers: int
    start: int
    stride: int = 1
    offset: int = 0
    stop: int | None = None


def carry_lanes(states: list[dict[str, Any]], world_size: int, num_workers: int,
                lengths: list[list[int]] | None = None) -> list[list[list[Lane]]]:
    """The rest of an epoch saved by ``len(states)`` ranks, split over ``world_size`` ranks × ``num_workers``
    logical workers: ``lanes[rank][worker]``. Every remaining sample lands in exactly one lane.

    With the old streams' ``lengths`` (``lengths[rank][worker]`` samples, from the manifests) the remaining samples,
    stream after stream, are cut into equal contiguous runs, one per new worker. Without them, with at least as many
    old streams as new workers, whole streams are dealt out round-robin; with fewer, each old stream is shared by
    striding over its remaining samples.
    """
    old = [Lane(rank, len(states), worker, len(state["positions"]), state["positions"][worker][0])
           for rank, state in enumerate(states) for worker in range(len(state["positions"]))
           if not state.get("finished")]
    slots = world_size * num_workers
    lanes: list[list[Lane]] = [[] for _ in range(slots)]
    if lengths is not None:
        ends = [lengths[lane.rank][lane.worker] for lane in old]
        rest = [max(0, end - lane.start) for lane, end in zip(old, ends)]
        total, index, done = sum(rest), 0, 0  # ``done``: samples of old[index]'s rest already handed out
        for slot in range(slots):
            want = (slot + 1) * total // slots - slot * total // slots
            while want and index < len(old):
                take = min(want, rest[index] - done)
                if take:
                    start = old[index].start + done
                    lanes[slot].append(dataclasses.replace(old[index], start=start, stop=start + take))
                want, done = want - take, done + take
                if done == rest[index]:
                    index, done = index + 1, 0
    elif len(old) >= slots:
        for index, lane in enumerate(old):
            lanes[index % slots].append(lane)
    else:
        for slot in range(slots):
            lane = old[slot % len(old)] if old else None
            if lane is not None:
                stride = len(range(slot % len(old), slots, len(old)))
                lanes[slot].append(dataclasses.replace(lane, stride=stride, offset=slot // len(old)))
    return [lanes[rank * num_workers:(rank + 1) * num_workers] for rank in range(world_size)]


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
                 worker_offset: int = 0, batches_per_worker: int | None = None,
                 lanes: list[list[Lane]] | None = None) -> None:
        super().__init__()
        self.cfg, self.rank, self.world_size, self.epoch = cfg, rank, world_size, epoch
        self.positions, self.worker_offset, self.batches_per_worker = positions, worker_offset, batches_per_worker
        self.lanes = lanes  # this rank's lanes per logical worker when the epoch was begun by another layout

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (physical + self.worker_offset) % num_workers
        start = self.positions[worker]
        cfg, prepare, limits = self.cfg, Preparer(self.cfg), image_limits(self.cfg)
        errors = DataErrors(source_of=source_names(cfg))
        limit = self.batches_per_worker
        raw_count, batches, items = start.raw, start.batches, []
        if limit is not None and batches >= limit:
            return
        if self.lanes is None:  # (rank, worker, position in that stream, sample): the randomness of its augmentation
            source = ((self.rank, worker, number, raw) for number, raw in
                      enumerate(self._stream(self.rank, self.world_size, worker, num_workers, errors), start=1))
        else:  # an epoch begun by another layout: each sample keeps its old stream's randomness
            source = ((lane.rank, lane.worker, number, raw) for lane in self.lanes[worker]
                      for number, raw in self._lane(lane, errors))
        for rank, stream_worker, number, raw in itertools.islice(source, start.raw, None):
            raw_count += 1
            errors.sample_read(raw["__url__"])
            try:
                items.append(prepare(decode_sample(raw, limits), _rng("sample", cfg.seed, self.epoch, rank,
                                                                      stream_worker, number)))
            except (ValueError, Image.DecompressionBombError) as err:
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

    def _stream(self, rank: int, world_size: int, worker: int, num_workers: int,
                errors: DataErrors) -> Iterator[dict[str, Any]]:
        """The undecoded samples of one logical worker of one rank of a layout, shuffled."""
        cfg = self.cfg
        stream = self._mixed(worker, errors) if cfg.resampled else self._split(rank, world_size, worker, num_workers,
                                                                               errors)
        if cfg.train and cfg.shuffle_buffer > 1:
            rng = _rng("buffer", cfg.seed, self.epoch, rank, worker)
            stream = wds.shuffle(cfg.shuffle_buffer, cfg.shuffle_initial, rng=rng)(stream)
        return stream

    def _lane(self, lane: Lane, errors: DataErrors) -> Iterator[tuple[int, dict[str, Any]]]:
        """A lane's samples with their 1-based position in the old stream."""
        stream = self._stream(lane.rank, lane.world_size, lane.worker, lane.num_workers, errors)
        for index, raw in enumerate(itertools.islice(stream, lane.start, lane.stop)):
            if index % lane.stride == lane.offset:
                yield lane.start + index + 1, raw

    def _split(self, rank: int, world_size: int, worker: int, num_workers: int,
               errors: DataErrors) -> Iterator[dict[str, Any]]:
        counts = shard_counts(self.cfg)
        for seg in stream_segments(self.cfg, self.epoch, rank, world_size, worker, num_workers, counts):
            yield from itertools.islice(read_raw(seg.url, errors), seg.first, seg.stop)

    def _mixed(self, worker: int, errors: DataErrors) -> Iterator[dict[str, Any]]:
        sources = self.cfg.sources
        streams = [self._resampled_source(src, worker, errors) for src in sources]
        rng = _rng("mix", self.cfg.seed, self.epoch, self.rank, worker)
        indices, weights = range(len(sources)), [src.weight for src in sources]
        while True:
            yield next(streams[rng.choices(indices, weights)[0]])

    def _resampled_source(self, src: SourceConfig, worker: int, errors: DataErrors) -> Iterator[dict[str, Any]]:
        urls = expand_urls(src.shards)
        empty_in_a_row = 0
        for url in resampled_shards(src, urls, self.cfg.seed, self.epoch, self.rank, worker):
            found = False
            for raw in read_raw(url, errors):
                found = True
                yield raw
            empty_in_a_row = 0 if found else empty_in_a_row + 1
            if empty_in_a_row >= max(16, 2 * len(urls)):
                raise RuntimeError(f"source '{src.name}': {empty_in_a_row} shards in a row held no readable sample "
                                   f"({src.shards}); check data.sources[].shards and the shard files")


def resampled_shards(src: SourceConfig, urls: list[str], seed: int, epoch: int, rank: int,
                     worker: int) -> Iterator[str]:
    """The endless shard draws (with replacement) of one worker of one rank from a source of a resampled stream."""
    rng = _rng("shards", src.name, seed, epoch, rank, worker)
    while True:
        yield rng.choice(urls)


def source_names(cfg: DataConfig) -> dict[str, str]:
    """Shard URL → name of the source it belongs to."""
    return {url: src.name for src in cfg.sources for url in expand_urls(src.shards)}


@dataclass(frozen=True)
class Segment:
    """Samples ``[first, stop)`` of one shard, in its order (``stop`` ``None``: to its end)."""

    url: str
    first: int = 0
    stop: int | None = None


def epoch_order(cfg: DataConfig, epoch: int) -> list[str]:
    """Every source's shards in the order of a non-resampled epoch: shuffled by (seed, epoch), the same on every rank,
    when training."""
    urls = [url for src in cfg.sources for url in expand_urls(src.shards)]
    if cfg.train and cfg.shard_shuffle:
        _rng("order", cfg.seed, epoch).shuffle(urls)
    return urls


def shard_counts(cfg: DataConfig) -> dict[str, int] | None:
    """Sample counts by shard file name from every source's manifest (``None`` when a source has none)."""
    if any(src.manifest is None for src in cfg.sources):
        return None
    return {name: n for src in cfg.sources for name, n in read_manifest(src.manifest).items()}


def epoch_segments(cfg: DataConfig, epoch: int, world_size: int, num_workers: int,
                   counts: dict[str, int] | None) -> list[list[Segment]]:
    """What every logical stream reads in a non-resampled epoch (``epoch_order``), by stream
    ``rank · num_workers + worker``.

    With at least one shard per stream, whole shards, taken by rank and then by worker. With fewer shards (a small
    set on many ranks), the samples of the ordered shards are cut into one contiguous run per stream by the
    manifests' ``counts``: every sample is read once, streams differ by at most one sample, and a stream skips into
    its first shard by reading it.
    """
    urls = epoch_order(cfg, epoch)
    streams = world_size * num_workers
    if len(urls) >= streams:
        return [[Segment(url) for url in urls[rank::world_size][worker::num_workers]]
                for rank in range(world_size) for worker in range(num_workers)]
    if counts is None:
        raise ValueError(f"{len(urls)} shards cannot feed {world_size} ranks × {num_workers} workers whole: give "
                         "every source a manifest (streams then share shards by sample), write more, smaller shards "
                         "(tools/make_shards.py) or lower data.num_workers")
    sizes = [counts[Path(url).name] for url in urls]
    total = sum(sizes)
    out: list[list[Segment]] = []
    shard, offset = 0, 0  # the shard holding the next stream's first sample, and that shard's first sample
    for stream in range(streams):
        start, stop = stream * total // streams, (stream + 1) * total // streams
        segments = []
        while shard < len(urls) and offset < stop:
            first, last = max(start, offset), min(stop, offset + sizes[shard])
            if first < last:
                segments.append(Segment(urls[shard], first - offset, last - offset))
            if offset + sizes[shard] > stop:
                break  # the next stream continues in this shard
            offset += sizes[shard]
            shard += 1
        out.append(segments)
    return out


def segment_samples(segments: list[Segment], counts: dict[str, int]) -> int:
    """How many samples ``segments`` hold by the manifests' ``counts``."""
    return sum((counts[Path(seg.url).name] if seg.stop is None else seg.stop) - seg.first for seg in segments)


def stream_segments(cfg: DataConfig, epoch: int, rank: int, world_size: int, worker: int, num_workers: int,
                    counts: dict[str, int] | None) -> list[Segment]:
    """What one logical worker of one rank reads in a non-resampled epoch (see ``epoch_segments``)."""
    return epoch_segments(cfg, epoch, world_size, num_workers, counts)[rank * num_workers + worker]


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
        self.lanes: list[list[Lane]] | None = None  # set while finishing an epoch begun by another number of ranks
        self._reset_position()
        if not cfg.resampled:  # fails here, naming the fix, when the shards cannot be split over the streams
            stream_segments(cfg, 0, self.rank, self.world_size, 0, self.num_workers, shard_counts(cfg))

    def _reset_position(self) -> None:
        self.received = 0
        self.batches = 0
        self.positions = [StreamPosition() for _ in range(self.num_workers)]

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning at the next iteration."""
        self.epoch = epoch
        self.lanes = None
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
        for src in self.cfg.sources:
            if src.manifest is None:
                raise TypeError(f"the length of a non-resampled stream needs manifests; source '{src.name}' has none")
            source_size(src)  # validates the manifest covers every shard
        counts = shard_counts(self.cfg)
        total = 0
        for worker in range(self.num_workers):
            n = segment_samples(stream_segments(self.cfg, self.epoch, self.rank, self.world_size, worker,
                                                self.num_workers, counts), counts)
            total += n // self.cfg.batch_size if self.cfg.drop_last else math.ceil(n / self.cfg.batch_size)
        return total

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = ShardStream(self.cfg, self.rank, self.world_size, self.epoch, list(self.positions),
                             worker_offset=self.received % self.num_workers,
                             batches_per_worker=self.batches_per_worker(), lanes=self.lanes)
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
                "seed": self.cfg.seed, "resampled": self.cfg.resampled,
                "lanes": None if self.lanes is None else [[dataclasses.asdict(lane) for lane in worker]
                                                          for worker in self.lanes]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by ``state_dict``; the run layout must match the saved one."""
        for name, mine in (("num_workers", self.num_workers), ("world_size", self.world_size), ("rank", self.rank),
                           ("seed", self.cfg.seed), ("resampled", self.cfg.resampled)):
            if state[name] != mine:
                raise ValueError(f"data position was saved with {name}={state[name]!r} but this loader has "
                                 f"{name}={mine!r}; resume with the same data.{name} / world size")
        self.epoch, self.received, self.batches = state["epoch"], state["received"], state["batches"]
        self.positions = [StreamPosition(raw, batches) for raw, batches in state["positions"]]
        lanes = state.get("lanes")
        self.lanes = None if lanes is None else [[Lane(**lane) for lane in worker] for worker in lanes]
        self.errors = DataErrors()
        self.errors.load_state_dict(state["errors"])

    def _stream_lengths(self, epoch: int, world_size: int, num_workers: int) -> list[list[int]] | None:
        """Samples per logical stream of a non-resampled epoch on another layout (``None`` without manifests)."""
        counts = shard_counts(self.cfg)
        if counts is None:
            return None
        sizes = [segment_samples(segments, counts)
                 for segments in epoch_segments(self.cfg, epoch, world_size, num_workers, counts)]
        return [sizes[rank * num_workers:(rank + 1) * num_workers] for rank in range(world_size)]

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Continue from positions saved by ``len(states)`` ranks on this loader's (different) number of ranks.

        At an epoch boundary the epoch simply starts on the new layout. Inside an epoch, a non-resampled stream
        finishes that epoch exactly (``carry_lanes``: every sample the old ranks had not yet consumed is read once,
        by one new rank, with its old augmentation randomness) and then goes on in the new layout; a resampled stream
        moves on to the next epoch on the new layout (its shards are drawn with replacement, so no sample is owed; the
        continuation is deterministic). Rank 0 carries the skipped-sample counts of every old rank.
        """
        for name, mine in (("seed", self.cfg.seed), ("resampled", self.cfg.resampled)):
            if states[0][name] != mine:
                raise ValueError(f"data position was saved with {name}={states[0][name]!r} but this loader has "
                                 f"{name}={mine!r}; resume with the same data.{name}")
        epochs = sorted({state["epoch"] for state in states})
        if len(epochs) == 1 and all(state["received"] == 0 for state in states):  # an epoch boundary
            self.set_epoch(epochs[0])
        elif self.cfg.resampled:
            self.set_epoch(epochs[-1] + 1)
        else:
            epoch = epochs[0]
            finished = [state["epoch"] > epoch for state in states]  # these ranks read all of their share
            if any(state["epoch"] > epoch + 1 or (done and state["received"]) for state, done in zip(states, finished)):
                raise ValueError(f"the data positions saved by {len(states)} ranks lie in different epochs "
                                 f"({epochs}); resume on {len(states)} ranks")
            if any(state.get("lanes") is not None for state in states):
                raise ValueError("the data position was saved while finishing an epoch begun by another number of "
                                 f"ranks; resume on {len(states)} ranks until epoch {epoch + 1} begins")
            self.set_epoch(epoch)
            marked = [{**state, "finished": done} for state, done in zip(states, finished)]
            self.lanes = carry_lanes(marked, self.world_size, self.num_workers,
                                     self._stream_lengths(epoch, len(states), states[0]["num_workers"]))[self.rank]
        self.errors = DataErrors()
        if self.rank == 0:
            for state in states:
                old = DataErrors()
                old.load_state_dict(state["errors"])
                self.errors.merge(old)


def check_config(cfg: DataConfig, where: str = "data") -> None:
    """Reject a data config that cannot work, naming the key (under ``where`` in the YAML) and the fix."""
    if not cfg.sources:
        raise ValueError(f"{where}.sources is empty: list at least one {{name, shards}} source")
    for i, src in enumerate(cfg.sources):
        check_shard_files(src.shards, f"{where}.sources[{i}].shards")
        if src.weight <= 0:
            raise ValueError(f"{where}.sources[{i}].weight must be > 0, got {src.weight}")
        if src.manifest is not None and not Path(src.manifest).expanduser().is_file():
            raise ValueError(f"{where}.sources[{i}].manifest: {src.manifest} does not exist; point it at the "
                             "manifest.json that tools/make_shards.py wrote beside the shards, or remove it")
        if src.manifest is not None or (cfg.resampled and cfg.epoch_samples is None):
            try:
                source_size(src)
            except ValueError as err:
                raise ValueError(f"{where}.sources[{i}]: {err}") from None
    if cfg.batch_size < 1:
        raise ValueError(f"{where}.batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.num_workers < 0:
        raise ValueError(f"{where}.num_workers must be >= 0 (0 reads in the training process), got {cfg.num_workers}")
    if not 0.0 <= cfg.warn_skipped_fraction <= 1.0:
        raise ValueError(f"{where}.warn_skipped_fraction must be between 0 and 1, got {cfg.warn_skipped_fraction}")
    if cfg.max_image_pixels < 1 or cfg.max_image_aspect < 1:
        raise ValueError(f"{where}.max_image_pixels must be >= 1 and {where}.max_image_aspect >= 1, got "
                         f"{cfg.max_image_pixels} and {cfg.max_image_aspect}")
    if cfg.num_frames < 1 or cfg.questions_per_video < 1:
        raise ValueError(f"{where}.num_frames and {where}.questions_per_video must be >= 1, got {cfg.num_frames} "
                         f"and {cfg.questions_per_video}")
    if cfg.image_res % cfg.patch_size:
        raise ValueError(f"{where}.image_res ({cfg.image_res}) must be a multiple of {where}.patch_size "
                         f"({cfg.patch_size})")


def check_shard_files(shards: str, key: str) -> None:
    """The pattern ``shards`` expands to at least one shard, and every local one exists (URLs are not probed)."""
    urls = expand_urls(shards)
    if not urls:
        raise ValueError(f"{key} ('{shards}') expands to no shard; give a brace pattern like "
                         "'/data/cc3m/{000000..000331}.tar' or a glob matching existing files")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).expanduser().is_file()]
    if missing:
        raise ValueError(f"{key}: shard file {missing[0]} does not exist ({len(missing)} of {len(urls)} missing); "
                         "fix the pattern or write the shards with tools/make_shards.py")


def build_loader(cfg: DataConfig, rank: int | None = None, world_size: int | None = None) -> ShardLoader:
    """The loader for ``cfg`` on this rank (rank/world size default to torch.distributed's)."""
    return ShardLoader(cfg, rank, world_size)
