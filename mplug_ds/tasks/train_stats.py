"""What evaluation needs to know about the training data: trivial baselines (the most frequent training answer or
caption) and VQA's default candidate answers. Only the samples' annotations are read, never their images."""
from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch.distributed as dist

from mplug_ds.data.data_config import SourceConfig
from mplug_ds.data.reading import DataErrors, expand_urls, read_raw
from mplug_ds.data.sample import Sample
from mplug_ds.distributed import get_rank, get_world_size

T = TypeVar("T")


def training_annotations(sources: Sequence[SourceConfig], limit: int) -> Iterator[Sample]:
    """Up to ``limit`` samples of the training shards in shard order, without their images (unreadable
    annotations are skipped)."""
    errors, n = DataErrors(), 0
    for source in sources:
        for url in expand_urls(source.shards):
            for raw in read_raw(url, errors):
                if n >= limit:
                    return
                try:
                    yield Sample.from_meta(json.loads(raw["json"].decode("utf-8")))
                except (KeyError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
                    continue
                n += 1


def on_rank0(compute: Callable[[], T]) -> T:
    """``compute()`` run on rank 0 only, its (picklable) result handed to every rank."""
    value: list[Any] = [compute() if get_rank() == 0 else None]
    if get_world_size() > 1:
        dist.broadcast_object_list(value, src=0)
    return value[0]
