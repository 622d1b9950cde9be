"""Video question answering (MSRVTT-QA, MSVD-QA): VQA (``tasks/vqa.py``) on a clip's frame tokens.

A shard sample is one video with all its questions. Training reads ``data.pipeline.questions_per_video`` of them per
visit, encodes the clip once and fuses its tokens with each question (the VQA answer loss, weight 1 per answer).
Evaluation encodes each video once (on the rank that owns it) and answers all its questions, by ranking the
candidate answers (the published protocol: the training answer list, ``train_ans2label.json`` as
``task.options.answer_list``, top ``k_test`` by first token, then the whole answer's log-probability) or by beam
search. Metric: exact-match accuracy in percent, overall and per question type (``answer_type``: what, who, how,
where, when …); baseline: the most frequent training answer for every question.
"""
from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
from torch import nn

from mplug_ds.data.collate import Preparer, stack_visual
from mplug_ds.data.data_config import DataConfig
from mplug_ds.data.sample import Sample
from mplug_ds.distributed import get_rank
from mplug_ds.eval.distributed import gather_to_rank0, lockstep_batches
from mplug_ds.eval.pictures import Panel
from mplug_ds.eval.vqa import clean_answer, exact_match
from mplug_ds.tasks.base import EvalResult, EvalSamples
from mplug_ds.tasks.visual import picture
from mplug_ds.tasks.vqa import VQAConfig, VQATask


@dataclass
class VideoQAConfig(VQAConfig):
    """VQA's options, ranking the training answers by default (the published protocol)."""

    mode: Literal["generate", "rank"] = "rank"


class VideoQATask(VQATask):
    """MSRVTT-QA / MSVD-QA: exact-match accuracy (percent), overall and per question type."""

    name = "video_qa"
    sample_task = "video_qa"
    config_type = VideoQAConfig
    required_fields = ("video", "texts", "answers")
    uses = (*VQATask.uses, "temporal_pos_embed")  # the frames' learned embedding, when the model has one
    normalize = staticmethod(clean_answer)

    def format_metric(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> str:
        acc, base = metrics.get("acc", float("nan")), baseline.get("acc", float("nan"))
        ratio = f" = {acc / base:.1f}×" if base > 0 else ""
        types = ", ".join(f"{k[4:]} {v:.1f}" for k, v in metrics.items() if k.startswith("acc/"))
        return (f"acc (exact match, %): {acc:.2f} vs most frequent training answer '{self._baseline_answer}' "
                f"{base:.2f}{ratio}; per question type: {types}")

    @torch.no_grad()
    def evaluate(self, module: nn.Module, samples: EvalSamples, data: DataConfig, batch_size: int,
                 device: torch.device) -> EvalResult:
        prepare = Preparer(dataclasses.replace(data, task="video_qa", train=False))
        answer = self.answerer(module, data, device)
        prior = self.answer_prior(data)
        predictions = []
        for chunk, real in lockstep_batches(samples, batch_size, samples[0] if samples else None, device):
            videos = [prepare(sample, random.Random(index)) | {"index": index} for index, sample in chunk]
            visual = module.visual({k: v.to(device) for k, v in stack_visual(videos).items()})
            questions = [(v, n, q) for v, video in enumerate(videos) for n, q in enumerate(video["questions"])]
            # every rank answers as many question batches as the rank with the most questions (lockstep)
            for group, real_group in lockstep_batches(questions, batch_size, questions[0], device):
                answers = answer(visual[[v for v, _, _ in group]], [q for _, _, q in group])
                if real and real_group:
                    predictions += [{"key": (videos[v]["index"], n), "index": videos[v]["index"],
                                     "question_id": q["question_id"], "question": q["question"], "answer": a,
                                     "human_answers": q["answers"], "answer_type": q["answer_type"]}
                                    for (v, n, q), a in zip(group, answers)]
        result = self.scored(gather_to_rank0(predictions), prior, exact_match, key="key")
        if get_rank() == 0:
            result.metrics["num_videos"] = float(len({p["index"] for p in result.predictions}))
            result.predictions = per_video(result.predictions)
        return result

    def panel(self, sample: Sample, prediction: dict[str, Any]) -> Panel:
        lines = [f"{'✓' if exact_match(p['answer'], p['human_answers']) else '✗'} {p['question']} → {p['answer']}"
                 f" (truth: {p['human_answers'][0]})" for p in prediction["questions"][:3]]
        right = [exact_match(p["answer"], p["human_answers"]) for p in prediction["questions"]]
        return Panel(images=picture(sample), lines=lines, correct=all(right) if right else None)


def per_video(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-question predictions grouped by video (``index``), for the picture."""
    grouped: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for p in predictions:
        grouped[p["index"]].append(p)
    return [{"index": index, "questions": questions} for index, questions in grouped.items()]
