"""Which frames of a clip a sample uses: the frame-sampling strategies (``data.pipeline.frame_sampling``).

Every strategy maps a clip of ``length`` decoded frames to exactly ``count`` frame indices in clip order:

``linspace`` (the default)  ``count`` frames evenly spread from the first frame to the last (rounded);
                            one frame: the middle one.
``segment_middle``          the clip cut into ``count`` equal segments, the middle frame of each (TSN-style
                            evaluation, as VindLU / UMT / mPLUG-2).
``segment_random``          one random frame of each segment (TSN-style training).
``mplug_uniform``           the official mPLUG / ALPRO ``np.arange(0, length, length / count, dtype=int)``: numpy
                            truncates the step to an integer, so the frames are ``floor(length / count)`` apart from
                            frame 0 and the end of the clip is never reached; a clip shorter than ``count`` gives
                            ``count`` copies of frame 0. Only for reproducing the published zero-shot figures.

A clip shorter than ``count`` repeats frames: ``linspace`` and the segment strategies spread the repeats evenly over
the clip (each frame is used about ``count / length`` times); only ``mplug_uniform`` collapses to frame 0.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Literal

import numpy as np

Strategy = Callable[[int, int, random.Random], list[int]]
FrameSampling = Literal["linspace", "segment_middle", "segment_random", "mplug_uniform"]  # the keys of STRATEGIES


def _linspace(length: int, count: int, rng: random.Random) -> list[int]:
    if count == 1:
        return [(length - 1) // 2]
    return [round(i * (length - 1) / (count - 1)) for i in range(count)]


def _segment_bounds(length: int, count: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each of ``count`` equal segments of ``length`` frames (never empty: short clips share)."""
    bounds = []
    for i in range(count):
        start = min(math.floor(i * length / count), length - 1)
        bounds.append((start, max(start + 1, math.floor((i + 1) * length / count))))
    return bounds


def _segment_middle(length: int, count: int, rng: random.Random) -> list[int]:
    return [min((start + end) // 2, end - 1) for start, end in _segment_bounds(length, count)]


def _segment_random(length: int, count: int, rng: random.Random) -> list[int]:
    return [rng.randrange(start, end) for start, end in _segment_bounds(length, count)]


def _mplug_uniform(length: int, count: int, rng: random.Random) -> list[int]:
    indices = np.arange(0, length, length / count, dtype=int).tolist()
    return indices[:count]  # float rounding can make arange one longer than count


STRATEGIES: dict[str, Strategy] = {"linspace": _linspace, "segment_middle": _segment_middle,
                                   "segment_random": _segment_random, "mplug_uniform": _mplug_uniform}


def frame_indices(length: int, count: int, strategy: str, rng: random.Random) -> list[int]:
    """``count`` indices into a clip of ``length`` frames, chosen by ``strategy`` (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown frame sampling '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    if length < 1 or count < 1:
        raise ValueError(f"cannot pick {count} frames from a clip of {length} frames")
    return STRATEGIES[strategy](length, count, rng)
