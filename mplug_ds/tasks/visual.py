"""What a task reads of a batch's pictures (images or clips) and how an evaluated sample is shown."""
from __future__ import annotations

import random
from typing import Mapping

import torch
from PIL import Image

from mplug_ds.data.frames import frame_indices
from mplug_ds.data.sample import Sample
from mplug_ds.data.transforms import normalize_clip
from mplug_ds.data.video import PyAVDecoder

SHOWN_FRAMES = 4  # frames of a clip in an evaluation's picture


def visual_input(batch: Mapping[str, torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """The pixels the model encodes: the batch's ``image`` as it is, or its ``video``'s uint8 frames CLIP-normalised
    (on ``device`` when given: frames travel as 8 bits)."""
    if "video" in batch:
        frames = batch["video"]
        return normalize_clip(frames if device is None else frames.to(device))
    return batch["image"] if device is None else batch["image"].to(device)


def picture(sample: Sample) -> list[Image.Image]:
    """A sample's picture for a panel: its image, or ``SHOWN_FRAMES`` frames spread over its clip."""
    if sample.video is None:
        return [sample.image]
    return PyAVDecoder().read(sample.video, lambda n: frame_indices(n, SHOWN_FRAMES, "linspace", random.Random(0)))
