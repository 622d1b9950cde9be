"""Video captioning (VATEX): image captioning (``tasks/caption.py``) with the decoder reading a clip's frame tokens.

Published zero-shot setting (mPLUG's VATEX evaluation): prompt "a picture of", beam 10, 15–25 tokens, GNMT length
penalty 0.6; the text encoder and fusion are not used. Metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap)
against every English reference; baseline: the most frequent training caption for every clip.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mplug_ds.data.data_config import DataConfig
from mplug_ds.tasks.base import EvalResult, EvalSamples
from mplug_ds.tasks.caption import CaptionConfig, CaptionTask


@dataclass
class VideoCaptionConfig(CaptionConfig):
    """Captioning's options with the published VATEX decoding."""

    num_beams: int = 10
    min_length: int = 15
    max_length: int = 25
    prompt: str = "a picture of"


class VideoCaptionTask(CaptionTask):
    """VATEX captioning: CIDEr selects."""

    name = "video_caption"
    config_type = VideoCaptionConfig
    required_fields = ("video", "texts")
    uses = (*CaptionTask.uses, "temporal_pos_embed")  # the frames' learned embedding, when the model has one

    def evaluate(self, module: nn.Module, samples: EvalSamples, data: DataConfig, batch_size: int,
                 device: torch.device) -> EvalResult:
        result = super().evaluate(module, samples, data, batch_size, device)
        if "num_images" in result.metrics:
            result.metrics["num_videos"] = result.metrics.pop("num_images")
        return result
