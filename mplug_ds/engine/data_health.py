"""Skipped-sample accounting across ranks: per-source counts for the step log, the summary and metrics.jsonl.

Each rank's stream counts what it read and skipped (``DataErrors.by_source``); ``SkippedSamples.gather`` sums
those counts over ranks (a collective: every rank calls it at the same step) and warns once per source whose
skipped fraction passes the stream's ``warn_skipped_fraction`` (``data.pipeline.warn_skipped_fraction``). Streams
without shards (synthetic data) report nothing.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from mplug_ds.data.reading import COUNTS


class SkippedSamples:
    """Cumulative, all-rank counts of samples read and skipped per data source."""

    def __init__(self, stream: Any, world_size: int, warn: Callable[[str], None]) -> None:
        self.stream, self.world_size, self._warn = stream, world_size, warn
        self.sources: list[str] = list(getattr(stream, "source_names", []))
        self.warn_fraction: float = getattr(stream, "warn_skipped_fraction", 1.0)
        self.warned: set[str] = set()

    def gather(self) -> dict[str, dict[str, float]]:
        """``{source: {read, corrupt_samples, damaged_shards, skipped_fraction}}`` over all ranks (empty for
        streams without shards)."""
        if not self.sources:
            return {}
        local = self.stream.errors.by_source
        counts = torch.tensor([[local.get(name, {}).get(c, 0) for c in COUNTS] for name in self.sources],
                              dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(counts)
        report = {}
        for name, row in zip(self.sources, counts.tolist()):
            entry: dict[str, float] = {c: int(v) for c, v in zip(COUNTS, row)}
            entry["skipped_fraction"] = entry["corrupt_samples"] / entry["read"] if entry["read"] else 0.0
            report[name] = entry
        for name, entry in report.items():
            if name not in self.warned and entry["skipped_fraction"] > self.warn_fraction:
                self.warned.add(name)
                self._warn(warning_line(name, entry, self.warn_fraction))
        return report


def warning_line(source: str, entry: dict[str, float], warn_fraction: float) -> str:
    """The loud line for a source that skips too much."""
    return (f"WARNING: data source '{source}' skipped {entry['corrupt_samples']} of {entry['read']} samples read "
            f"({entry['skipped_fraction']:.1%}, above data.pipeline.warn_skipped_fraction={warn_fraction:g}) and "
            f"{entry['damaged_shards']} damaged shard(s); the rank logs name each one (check the shards or "
            "rebuild them with tools/make_shards.py)")


def format_skipped(report: dict[str, dict[str, float]]) -> str:
    """``name skipped/read (pct)`` per source, e.g. ``cc3m 3/1200 (0.2%), 1 damaged shard``."""
    parts = []
    for name, e in report.items():
        text = f"{name} {e['corrupt_samples']}/{e['read']} ({e['skipped_fraction']:.1%})"
        if e["damaged_shards"]:
            text += f", {e['damaged_shards']} damaged shard(s)"
        parts.append(text)
    return ", ".join(parts)
