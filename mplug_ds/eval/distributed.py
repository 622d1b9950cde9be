"""Exact distributed evaluation: every sample evaluated once, whatever the world size.

Rank r takes samples r, r + W, r + 2W, … (no padding to equal counts). Because forwards under ZeRO-3 are
collectives, every rank still runs the same number of batches: ranks with fewer samples run filler batches
whose outputs are dropped. Predictions carry their sample index; rank 0 gathers them and checks that every
index appears exactly once. Reading and each batch count as progress for the hang watchdog.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from mplug_ds.data.reading import DataErrors, decode_sample, expand_urls, read_raw
from mplug_ds.data.sample import Sample
from mplug_ds.distributed import get_rank, get_world_size, range_over_ranks
from mplug_ds.runtime import watchdog

T = TypeVar("T")


def owned(index: int, rank: int, world_size: int) -> bool:
    """Whether sample ``index`` is evaluated by ``rank``."""
    return index % world_size == rank


def read_eval_samples(shards: str, max_samples: int | None = None, rank: int | None = None,
                      world_size: int | None = None, errors: DataErrors | None = None
                      ) -> Iterator[tuple[int, Sample]]:
    """``(index, sample)`` of this rank's share of an evaluation set, in shard order.

    Indices count the stored samples of every shard in order (the first ``max_samples`` of them), identically
    on every rank; only this rank's samples are decoded. Corrupt samples are skipped and counted in ``errors``.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    errors = errors if errors is not None else DataErrors()
    index = 0
    for url in expand_urls(shards):
        for raw in read_raw(url, errors):
            if max_samples is not None and index >= max_samples:
                return
            watchdog.beat(evaluation_samples_read=index)
            if owned(index, rank, world_size):
                try:
                    yield index, decode_sample(raw)
                except ValueError as err:
                    errors.sample_failed(raw["__url__"], raw["__key__"], str(err))
            index += 1


NO_FILLER_NEEDED = 1 << 62  # a rank with a filler item can pad any number of batches


def lockstep_batches(items: Sequence[T], batch_size: int, filler: T | None,
                     device: torch.device | str = "cpu") -> Iterator[tuple[list[T], bool]]:
    """Split ``items`` into batches, padded with ``(filler batch, False)`` so every rank yields as many batches.

    ``filler`` (any valid item) is needed only by a rank that may run out first; its outputs must be dropped. When
    a rank without one would need it, every rank raises the same ``ValueError`` before any batch (a rank failing
    alone would leave the others waiting in their next forward).
    """
    local = math.ceil(len(items) / batch_size)
    # One all-reduce: the most batches, and the fewest batches of a rank without a filler.
    fewest, most = range_over_ranks([local, local if filler is None else NO_FILLER_NEEDED], device)
    total, fewest_without = most[0], fewest[1]
    if fewest_without < total:
        raise ValueError(f"a rank has only {fewest_without} of the {total} evaluation batches and no sample to run "
                         f"filler batches with: the evaluation set needs at least as many samples as ranks "
                         f"({get_world_size()})")
    for b in range(total):
        watchdog.beat(evaluation_batch=f"{b + 1}/{total}")
        if b < local:
            yield list(items[b * batch_size:(b + 1) * batch_size]), True
        else:
            yield [filler], False


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable) as a list ordered by rank on rank 0; ``None`` on the other ranks."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size() if get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable) on every rank, ordered by rank."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def merge_predictions(per_rank: list[list[dict[str, Any]]], id_key: str = "index") -> list[dict[str, Any]]:
    """Predictions of all ranks in sample order; raises if a sample was predicted twice (an exactness bug)."""
    merged: dict[Any, dict[str, Any]] = {}
    for predictions in per_rank:
        for p in predictions:
            if p[id_key] in merged:
                raise RuntimeError(f"sample {p[id_key]} was evaluated more than once; evaluation is not exact")
            merged[p[id_key]] = p
    return [merged[k] for k in sorted(merged)]
