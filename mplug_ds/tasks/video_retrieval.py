"""Text–video retrieval (MSR-VTT): image retrieval on clips (``tasks/retrieval.py``), its figures named by direction.

A clip's contrastive feature is the mean of its frames' projected class tokens and its matching memory all frames'
tokens (``MPLUG.encode_visual``); training and the exact sharded evaluation are retrieval's. Re-ranking scores a
candidate by its matching logit plus its contrastive similarity, as the published MSR-VTT evaluation does
(``task.options.rerank_score: itm`` for the logit alone). Figures: ``t2v_*`` text → video (what papers report as
MSR-VTT R@1), ``v2t_*`` video → text; R@1/5/10, median rank ``*_mdr`` and mean rank ``*_mnr`` (lower is better).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import torch
from torch import nn

from mplug_ds.data.data_config import DataConfig
from mplug_ds.tasks.base import EvalResult, EvalSamples
from mplug_ds.tasks.retrieval import RetrievalConfig, RetrievalTask


@dataclass
class VideoRetrievalConfig(RetrievalConfig):
    """Retrieval's options with the published video re-ranking score and candidate count."""

    k_test: int = 128
    rerank_score: Literal["itm", "itm_plus_itc"] = "itm_plus_itc"


def by_direction(figures: Mapping[str, float]) -> dict[str, float]:
    """Retrieval's figure names for videos: ``tr_*`` (image → text) → ``v2t_*``, ``ir_*`` → ``t2v_*``."""
    return {k.replace("tr_", "v2t_").replace("ir_", "t2v_").replace("num_images", "num_videos"): v
            for k, v in figures.items()}


class VideoRetrievalTask(RetrievalTask):
    """MSR-VTT retrieval: t2v / v2t R@1/5/10, MdR, MnR; ``t2v_r1`` selects."""

    name = "video_retrieval"
    metric = "t2v_r1"
    config_type = VideoRetrievalConfig
    required_fields = ("video", "texts")
    uses = (*RetrievalTask.uses, "temporal_pos_embed")  # the frames' learned embedding, when the model has one
    shown = "video"

    def evaluate(self, module: nn.Module, samples: EvalSamples, data: DataConfig, batch_size: int,
                 device: torch.device) -> EvalResult:
        result = super().evaluate(module, samples, data, batch_size, device)
        result.metrics, result.baseline = by_direction(result.metrics), by_direction(result.baseline)
        return result

    def format_metric(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> str:
        parts = []
        for key, label in (("t2v_r1", "text→video R@1"), ("v2t_r1", "video→text R@1"), ("r_mean", "mean recall")):
            value, chance = metrics.get(key, float("nan")), baseline.get(key, float("nan"))
            ratio = f" = {value / chance:.1f}×" if chance > 0 else ""
            parts.append(f"{label} {value:.2f} vs chance {chance:.2f}{ratio}")
        return "; ".join(parts) + f"; text→video MdR {metrics.get('t2v_mdr', float('nan')):g}"
