"""Visual question answering (VQA v2, with VG QA as published), generative (mPLUG §7.1).

The decoder reads the fused ``[image; question]`` memory and writes the answer. Training: every question has its
distinct answers with weights (VQA: share of the ten annotators; VG: 0.5); each answer's summed token NLL is
weighted and the sum divided by the number of questions. Evaluation: beam search (5 beams, 1–10 tokens, the
published setting) or, with ``mode: rank``, ALBEF's ranking of a candidate answer list (top ``k_test`` by first-token
probability, re-scored by the whole answer's log-probability). Metric: the official VQA accuracy overall and per
answer type; results in the evaluation-server format ``[{"question_id", "answer"}]``.
"""
from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import nn

from mplug_ds.config import ConfigError
from mplug_ds.data.collate import Preparer, collate_vqa, tokenize
from mplug_ds.data.data_config import DataConfig
from mplug_ds.data.sample import Sample
from mplug_ds.data.tokenizer import CLS_ID, SEP_ID, get_tokenizer
from mplug_ds.eval.distributed import gather_to_rank0, merge_predictions
from mplug_ds.eval.pictures import Panel
from mplug_ds.eval.vqa import normalize_answer, question_accuracy, vqa_accuracy
from mplug_ds.models.generation import BeamConfig, beam_search, rank_answers
from mplug_ds.models.mplug import MPLUG
from mplug_ds.tasks.base import FUSED, EvalResult, EvalSamples, SampleTask, predict_in_lockstep
from mplug_ds.tasks.train_stats import on_rank0, training_annotations

Batch = dict[str, torch.Tensor]


@dataclass
class VQAConfig:
    """Options of the VQA objective and its evaluation."""

    mode: Literal["generate", "rank"] = "generate"  # rank: choose from a candidate answer list
    num_beams: int = 5
    min_length: int = 1  # answer tokens before [SEP]
    max_length: int = 10  # answer tokens including [SEP]
    length_penalty: float = 0.6
    answer_list: str | None = None  # mode=rank: JSON array of candidate answers (default: frequent training answers)
    answer_list_size: int = 3129  # default candidate list: this many most frequent (normalised) training answers
    k_test: int = 128  # mode=rank: candidates re-scored per question
    train_scan_samples: int = 100_000  # training questions read for the baseline and the default answer list


class VQAModel(nn.Module):
    """The module DeepSpeed trains for VQA: mPLUG whose decoder answers from the fused image-question memory."""

    def __init__(self, model: MPLUG) -> None:
        super().__init__()
        self.model = model

    def memory(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder memory ``[image_out; question_out]`` and its mask."""
        m, mask = self.model, batch["question_mask"]
        image_out, text_out = m.fuse(m.encode_image(batch["image"]), m.encode_text(batch["question_ids"], mask), mask)
        return m.memory(image_out, text_out, mask)

    def forward(self, batch: Batch, **_: Any) -> dict[str, torch.Tensor]:
        """``loss`` = Σ_answers weight · (summed token NLL of ``answer [SEP]``) / number of questions."""
        memory, memory_mask = self.memory(batch)
        counts = batch["answer_counts"]
        nll, _ = self.model.decoder.token_nll(batch["answer_ids"], batch["answer_mask"],
                                              memory.repeat_interleave(counts, dim=0),
                                              memory_mask.repeat_interleave(counts, dim=0))
        return {"loss": (batch["answer_weights"] * nll.sum(dim=1)).sum() / counts.shape[0]}

    @torch.no_grad()
    def generate(self, batch: Batch, cfg: BeamConfig) -> list[str]:
        """Beam-searched answers, one string per question."""
        memory, memory_mask = self.memory(batch)
        prompt = torch.full((memory.shape[0], 1), CLS_ID, dtype=torch.long, device=memory.device)
        out = beam_search(self.model.decoder, memory, memory_mask, prompt, cfg, eos_id=SEP_ID)
        return [decode_text(t) for t in out.tokens]

    @torch.no_grad()
    def rank(self, batch: Batch, answers: list[str], answer_ids: torch.Tensor, answer_mask: torch.Tensor,
             k: int) -> list[str]:
        """The best of the candidate ``answers`` for each question."""
        memory, memory_mask = self.memory(batch)
        index, _ = rank_answers(self.model.decoder, memory, memory_mask, answer_ids, answer_mask, k)
        return [answers[i] for i in index.tolist()]


def decode_text(tokens: list[int]) -> str:
    """Generated ids → text, without special tokens."""
    return get_tokenizer().decode(tokens, skip_special_tokens=True).strip()


@dataclass
class AnswerPrior:
    """What evaluation uses from the training answers."""

    most_frequent: str | None  # the most frequent normalised training answer (weighted by annotator share)
    candidates: list[str]  # the most frequent normalised training answers, best first
    questions: int  # training questions read


class VQATask(SampleTask):
    """VQA v2: the official accuracy (percent) overall and per answer type; baseline: the most frequent training
    answer given to every question."""

    name = "vqa"
    sample_task = "vqa"
    loss_keys = ("loss",)
    metric = "acc"
    config_type = VQAConfig
    required_fields = ("texts",)
    results_name = "vqa_results"
    uses = (*FUSED, "decoder.")

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self._prior: AnswerPrior | None = None
        self._baseline_answer: str | None = None
        self._ranked: tuple[list[str], torch.Tensor, torch.Tensor] | None = None  # mode=rank: candidates, tokenised
        cfg = self.cfg
        if cfg.mode not in ("generate", "rank"):
            raise ConfigError(f"task.options.mode={cfg.mode!r}: choose generate or rank")
        if cfg.num_beams < 1 or not 1 <= cfg.min_length <= cfg.max_length or cfg.k_test < 1:
            raise ConfigError("task.options: need num_beams >= 1, 1 <= min_length <= max_length and k_test >= 1")
        if cfg.answer_list is not None and not Path(cfg.answer_list).expanduser().is_file():
            raise ConfigError(f"task.options.answer_list={cfg.answer_list}: no such file (a JSON array of answers)")

    def build(self, model: MPLUG) -> VQAModel:
        return VQAModel(model)

    def format_metric(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> str:
        acc, base = metrics.get("acc", float("nan")), baseline.get("acc", float("nan"))
        ratio = f" = {acc / base:.1f}×" if base > 0 else ""
        return (f"acc (VQA accuracy, %): {acc:.2f} vs most frequent training answer "
                f"'{self._baseline_answer}' {base:.2f}{ratio}")

    def answer_prior(self, data: DataConfig) -> AnswerPrior:
        """Counted once per process on rank 0 from the training shards' annotations, shared with every rank."""
        if self._prior is None:
            self._prior = on_rank0(lambda: count_answers(data, self.cfg))
        return self._prior

    def candidate_answers(self, data: DataConfig) -> list[str]:
        if self.cfg.answer_list is not None:
            answers = json.loads(Path(self.cfg.answer_list).expanduser().read_text())
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"task.options.answer_list={self.cfg.answer_list}: expected a JSON array of strings")
            return answers
        answers = self.answer_prior(data).candidates
        if not answers:
            raise ValueError("mode=rank found no training answers to rank: set task.options.answer_list")
        return answers

    def eval_items(self, samples: EvalSamples, data: DataConfig) -> list[dict[str, Any]]:
        prepare = Preparer(dataclasses.replace(data, task="vqa", train=False))
        return [prepare(sample, random.Random(0)) | {"index": index,
                                                     "human_answers": list(sample.extra.get("all_answers") or []),
                                                     "answer_type": sample.extra.get("answer_type")}
                for index, sample in samples]

    def _rank_inputs(self, data: DataConfig) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """mode=rank: the candidate answers and their ``answer [SEP]`` ids and mask (read once)."""
        if self._ranked is None:
            candidates = self.candidate_answers(data)
            ids, mask = tokenize([f"{a} [SEP]" for a in candidates], data.answer_max_len)
            self._ranked = candidates, ids, mask
        return self._ranked

    @torch.no_grad()
    def predict(self, module: nn.Module, items: list[dict[str, Any]], data: DataConfig,
                device: torch.device) -> list[dict[str, Any]]:
        """``answer``: beam search over the fused image-question memory, or (mode=rank) the best candidate."""
        cfg = self.cfg
        batch = collate_vqa(items, data.max_len, data.answer_max_len)
        tensors = {k: batch[k].to(device) for k in ("image", "question_ids", "question_mask")}
        if cfg.mode == "rank":
            candidates, ids, mask = self._rank_inputs(data)
            answers = module.rank(tensors, candidates, ids.to(device), mask.to(device), cfg.k_test)
        else:
            answers = module.generate(tensors, BeamConfig(cfg.num_beams, cfg.min_length, cfg.max_length,
                                                          cfg.length_penalty))
        return [{"answer": answer} for answer in answers]

    @torch.no_grad()
    def evaluate(self, module: nn.Module, samples: EvalSamples, data: DataConfig, batch_size: int,
                 device: torch.device) -> EvalResult:
        items = self.eval_items(samples, data)
        if self.cfg.mode == "rank":  # the candidates are read (on rank 0, shared) before the first batch
            self._rank_inputs(data)
        prior = self.answer_prior(data)
        predictions = predict_in_lockstep(self, module, items, data, batch_size, device,
                                          keep=("index", "question_id", "question", "human_answers", "answer_type"))
        gathered = gather_to_rank0(predictions)
        if gathered is None:
            return EvalResult()
        merged = merge_predictions(gathered)
        metrics = vqa_accuracy(merged)
        metrics["num_samples"] = float(len(merged))
        baseline_answer = prior.most_frequent
        if baseline_answer is None:  # no training annotations readable: the evaluation set's own most frequent
            counts = Counter(normalize_answer(a) for p in merged for a in p["human_answers"])
            baseline_answer = counts.most_common(1)[0][0] if counts else ""
        self._baseline_answer = baseline_answer
        base = vqa_accuracy([p | {"answer": baseline_answer} for p in merged])
        baseline = {"acc": base.get("acc", 0.0)} if "acc" in base else {}
        results = [{"question_id": p["question_id"], "answer": p["answer"]} for p in merged]
        return EvalResult(metrics=metrics, baseline=baseline, results=results, predictions=merged)

    def panel(self, sample: Sample, prediction: dict[str, Any]) -> Panel:
        human_answers = prediction.get("human_answers") or []  # none for a question of one's own
        if not human_answers:
            return Panel(images=[sample.image], lines=[prediction["question"], f"answer: {prediction['answer']}"])
        score = question_accuracy(prediction["answer"], human_answers)
        humans = Counter(human_answers).most_common(3)
        return Panel(images=[sample.image], correct=score > 0,
                     lines=[prediction["question"], f"answer: {prediction['answer']} (accuracy {score:.2f})",
                            "annotators: " + ", ".join(f"{a} ×{n}" for a, n in humans)])


def count_answers(data: DataConfig, cfg: VQAConfig) -> AnswerPrior:
    """Weighted counts of the normalised answers of (up to ``train_scan_samples``) training questions."""
    counts: Counter[str] = Counter()
    questions = 0
    for sample in training_annotations(data.sources, cfg.train_scan_samples):
        if not sample.answers:
            continue
        questions += 1
        weights = sample.answer_weights or [1.0 / len(sample.answers)] * len(sample.answers)
        for answer, weight in zip(sample.answers, weights):
            counts[normalize_answer(answer)] += weight
    ranked = [a for a, _ in counts.most_common(cfg.answer_list_size) if a]
    return AnswerPrior(ranked[0] if ranked else None, ranked, questions)
