"""Ask a trained model about images of one's own: ``mplug_ds.load(path)`` → ``Predictor``.

``path``: an export (``tools/export_checkpoint.py``, of a fine-tuning or a pre-training), a converted release
(``tools/convert_checkpoint.py``) or a run directory (DeepSpeed checkpoints, any ZeRO stage; the newest complete
one). The predictor runs each task's own evaluation steps (``SampleTask.eval_items`` then ``predict``;
``RetrievalTask.rank``) with the task options and text lengths of the run that made the checkpoint (its saved
``config.yaml``; an export carries it as ``run_config.yaml``), so what it predicts for an image is what that
run's evaluation predicts for it. It runs in this process, on the GPU when there is one, in fp32.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from mplug_ds.config import ConfigError, deep_merge, from_dict, parse_overrides, read_yaml
from mplug_ds.data.sample import Sample
from mplug_ds.engine.checkpoint import EXPORT_FILE, RUN_CONFIG_FILE, TASK_FILE, resolve_resume
from mplug_ds.models import hub
from mplug_ds.models.config import ModelConfig, load_model_config
from mplug_ds.models.mplug import build_model
from mplug_ds.tasks import TASKS, build_task
from mplug_ds.tasks.base import EvalSamples, FinetuneTask, SampleTask
from mplug_ds.tasks.evaluation import draw_predictions
from mplug_ds.tasks.finetune_config import FinetuneConfig
from mplug_ds.tasks.pretrained import WRAPPER_PREFIX, describe_untrained, untrained_parts
from mplug_ds.tasks.recipe import task_data_config
from mplug_ds.tasks.retrieval import Ranking, RetrievalTask

ImageInput = Union[str, Path, Image.Image, torch.Tensor]
CLASSIFIERS = ("nlvr2", "ve")


@dataclass
class Checkpoint:
    """What a checkpoint directory holds, read without building anything."""

    path: Path
    model_cfg: ModelConfig
    state: dict[str, torch.Tensor]  # the MPLUG's tensors
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # a fine-tuning's own tensors (``head.*``)
    trained_for: str | None = None  # the fine-tuning's task, "pretrain", or None (unknown: a converted release)
    run_config: Path | None = None  # the config.yaml of the run that made it
    random_init: list[str] = field(default_factory=list)  # tensors never trained

    def describe(self) -> str:
        """What it holds, in words (for errors)."""
        if self.trained_for == "pretrain":
            kind = "a pre-training checkpoint (no task head)"
        elif self.trained_for:
            kind = f"a '{self.trained_for}' fine-tuning" + (" with its head" if self.head else "")
        else:
            kind = "weights of unknown training (a converted release?) without a task head"
        never = sorted({k.split(".")[0] for k in self.random_init})
        return kind + (f"; never trained: {', '.join(never)}" if never else "")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """An export or converted directory, or a DeepSpeed run / checkpoints / ``step_*`` directory."""
    path = Path(path).expanduser()
    if (path / EXPORT_FILE).is_file():
        if (path / "model_config.yaml").is_file():
            model_cfg = load_model_config(path / "model_config.yaml")
        else:
            model_cfg = hub.read_config(path)
        with safe_open(str(path / EXPORT_FILE), "pt") as f:
            trained_for = (f.metadata() or {}).get("task")
        head = load_file(str(path / TASK_FILE)) if (path / TASK_FILE).is_file() else {}
        run_config = path / RUN_CONFIG_FILE
        return Checkpoint(path, model_cfg, load_file(str(path / EXPORT_FILE)), head, trained_for,
                          run_config if run_config.is_file() else None, hub.random_init_keys(path))
    try:
        tag = resolve_resume(str(path), path) if path.is_dir() else None
    except FileNotFoundError:
        tag = None
    if tag is None:
        raise FileNotFoundError(f"{path}: not an export (no {EXPORT_FILE}: tools/export_checkpoint.py or "
                                "tools/convert_checkpoint.py write one) nor a run directory with a complete checkpoint")
    from mplug_ds.engine.export import (find_run_model_config, read_module_state, run_file, run_random_init,
                                        run_task_name)

    merged = read_module_state(tag)  # never unpickles code
    state = {k[len(WRAPPER_PREFIX):]: v for k, v in merged.items() if k.startswith(WRAPPER_PREFIX)}
    head = {k: v for k, v in merged.items() if not k.startswith(WRAPPER_PREFIX)}
    return Checkpoint(tag, load_model_config(find_run_model_config(tag)), state, head, run_task_name(tag),
                      run_file(tag, "config.yaml"), run_random_init(tag))


def run_settings(config: str | Path | None, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """The settings predictions are made with: a fine-tuning config (a name under configs/tasks, or a YAML path such
    as a run's ``config.yaml``) with ``key=value`` overrides. From a pre-training's ``config.yaml`` only its text
    length and word limit are kept (the tasks' defaults otherwise)."""
    try:
        raw = read_yaml("tasks", config) if config is not None else {}
        if not (raw.get("task") or {}).get("name"):
            data = raw.get("data") or {}
            pipeline = {k: v for k, v in (data.get("pipeline") or {}).items() if k == "max_words"}
            kept = {"max_text_len": data.get("max_text_len"), "pipeline": pipeline}
            raw = {"data": {k: v for k, v in kept.items() if v}}
        return from_dict(FinetuneConfig, deep_merge(raw, parse_overrides(overrides)))
    except ConfigError as err:
        raise ValueError(f"predicting with config {config}: {err}") from None


def read_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, or a ``(3, H, W)`` tensor (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be (3, H, W), got {tuple(image.shape)}")
        return TF.to_pil_image(image if image.dtype == torch.uint8 else image.float().clamp(0, 1))
    try:
        with Image.open(Path(image).expanduser()) as opened:
            return opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"{image}: not a readable image ({err})") from None


def _same_length(images: Sequence[Any], texts: Sequence[str], what: str) -> None:
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} {what}: give one per image")


class Predictor:
    """A checkpoint's model in eval mode, asked batch by batch (``batch_size`` inputs at a time). ``settings``: the
    task options (used for the task they name) and text lengths to predict with."""

    def __init__(self, checkpoint: Checkpoint, settings: FinetuneConfig, device: str | torch.device | None = None,
                 batch_size: int | None = None) -> None:
        self.checkpoint = checkpoint
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.settings = settings
        self.batch_size = batch_size or self.settings.eval.batch_size
        model = build_model(checkpoint.model_cfg)
        model.load_state_dict(checkpoint.state, strict=True)
        self.model = model.to(self.device).eval()
        self._tasks: dict[str, tuple[FinetuneTask, nn.Module | None]] = {}
        if checkpoint.random_init:
            parts = untrained_parts(checkpoint.random_init, ("",))
            warnings.warn(f"{checkpoint.path}: never trained (left at random initialisation): "
                          f"{', '.join(f'{m} ({n} tensors)' for m, n in parts.items())}; the tasks that use them "
                          "are refused", stacklevel=3)

    # ------------------------------------------------------------------ the questions
    def caption(self, images: Sequence[ImageInput]) -> list[str]:
        """One caption per image (beam search, as the caption evaluation decodes)."""
        return [p["caption"] for p in self.predict("caption", images)[1]]

    def answer(self, images: Sequence[ImageInput], questions: Sequence[str]) -> list[str]:
        """The answer to each image's question."""
        return [p["answer"] for p in self.predict("vqa", images, questions)[1]]

    def ground(self, images: Sequence[ImageInput], expressions: Sequence[str]) -> list[list[float]]:
        """The box ``[x0, y0, x1, y1]`` (pixels of the image as given) each expression refers to."""
        return [p["pred_box"] for p in self.predict("grounding", images, expressions)[1]]

    def rank(self, images: Sequence[ImageInput], texts: Sequence[str]) -> Ranking:
        """Every image against every text: contrastive similarities, and both ways the best ``k_test`` re-ranked by
        the matching head (scores: its "match" logit), as the retrieval evaluation ranks them."""
        task, _ = self._task("retrieval")
        return task.rank(self.model, [read_image(i) for i in images], list(texts), self._data(task),
                         self.batch_size, self.device)

    def classify(self, images: Sequence[ImageInput | tuple[ImageInput, ImageInput]],
                 texts: Sequence[str]) -> list[dict[str, Any]]:
        """The checkpoint's classification head (NLVR2: ``images`` are (left, right) pairs; SNLI-VE: images):
        per input its ``label`` and ``probs`` by label name."""
        task_name = self.checkpoint.trained_for
        if task_name not in CLASSIFIERS or not self.checkpoint.head:
            raise ValueError(f"{self.checkpoint.path} holds no classification head: it is "
                             f"{self.checkpoint.describe()}; classify needs the export (or run directory) of an "
                             f"{' or '.join(CLASSIFIERS)} fine-tuning")
        task, _ = self._task(task_name)
        return [{"label": p["answer"], "probs": dict(zip(task.label_names, p["probs"]))}
                for p in self.predict(task_name, images, texts)[1]]

    # ------------------------------------------------------------------ the evaluation's steps
    def predict(self, task_name: str, images: Sequence[Any], texts: Sequence[str] | None = None
                ) -> tuple[EvalSamples, list[dict[str, Any]]]:
        """The samples built from the inputs and, per sample, the prediction exactly as the task's evaluation
        records it (without ground truth). ``retrieval``: per image its top texts (for the picture)."""
        samples = self.samples(task_name, images, texts)
        task, module = self._task(task_name)
        if isinstance(task, RetrievalTask):
            ranking = self.rank([s.image for _, s in samples], texts or [])
            return samples, [{"index": i, "texts": [(texts[t], score, None) for t, score in ranked[:3]]}
                             for i, ranked in enumerate(ranking.image_to_texts)]
        data = self._data(task)
        items = task.eval_items(samples, data)
        predictions = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            predicted = task.predict(module, chunk, data, self.device)
            predictions += [self._record(task_name, item) | p for item, p in zip(chunk, predicted)]
        return samples, predictions

    def draw(self, task_name: str, samples: EvalSamples, predictions: list[dict[str, Any]], out: str | Path,
             ) -> Path | None:
        """The evaluation's picture of these predictions (up to 8 inputs) as a PNG at ``out``."""
        return draw_predictions(self._task(task_name)[0], samples, predictions, Path(out),
                                title=f"{task_name} predictions of {self.checkpoint.path}")

    def samples(self, task_name: str, images: Sequence[Any], texts: Sequence[str] | None) -> EvalSamples:
        """The inputs as the samples an evaluation set would hold (no ground truth)."""
        if task_name not in TASKS:
            raise ValueError(f"unknown task '{task_name}': choose one of {', '.join(sorted(TASKS))}")
        if task_name == "retrieval":
            if not texts:
                raise ValueError("retrieval ranks texts against the images: give at least one text")
            return [(i, Sample(key=f"input_{i}", task="caption", image=read_image(image)))
                    for i, image in enumerate(images)]
        if task_name == "caption":
            return [(i, Sample(key=f"input_{i}", task="caption", image=read_image(image)))
                    for i, image in enumerate(images)]
        _same_length(images, texts or [], "texts")
        if task_name == "nlvr2":
            if any(len(pair) != 2 for pair in images):
                raise ValueError("nlvr2 takes (left, right) image pairs")
            return [(i, Sample(key=f"input_{i}", task="nlvr2", images=[read_image(p[0]), read_image(p[1])],
                               texts=[text])) for i, (p, text) in enumerate(zip(images, texts))]
        sample_task = TASKS[task_name].sample_task
        return [(i, Sample(key=f"input_{i}", task=sample_task, image=read_image(image), texts=[text]))
                for i, (image, text) in enumerate(zip(images, texts))]

    @staticmethod
    def _record(task_name: str, item: dict[str, Any]) -> dict[str, Any]:
        """The input fields the evaluation keeps beside a prediction (for the picture and the printout)."""
        fields = {"vqa": ("index", "question"), "grounding": ("index", "text", "image_size"),
                  "nlvr2": ("index", "text"), "ve": ("index", "text")}.get(task_name, ("index",))
        return {k: item[k] for k in fields}

    def _task(self, name: str) -> tuple[FinetuneTask, nn.Module | None]:
        """The task (its options from the run when the run was this task's fine-tuning) and its module, checked:
        a head it lacks or a part never trained is refused, a checkpoint trained for something else is warned
        about (once)."""
        if name in self._tasks:
            return self._tasks[name]
        ckpt = self.checkpoint
        own = ckpt.trained_for == name
        task = build_task(name, self.settings.task.options if self.settings.task.name == name else None)
        parts = untrained_parts(ckpt.random_init, task.uses)
        if parts:
            raise ValueError(f"{describe_untrained(ckpt.path, name, parts)}; its predictions would be meaningless: "
                             f"use a checkpoint fine-tuned for '{name}'")
        if task.head_prefixes and not (own and any(k.startswith(task.head_prefixes) for k in ckpt.head)):
            raise ValueError(f"{ckpt.path} holds no '{name}' head: it is {ckpt.describe()}")
        if ckpt.trained_for is not None and not own and not (name == "retrieval" and ckpt.trained_for == "pretrain"):
            warnings.warn(f"{ckpt.path} is {ckpt.describe()}, not a '{name}' fine-tuning: its '{name}' predictions "
                          "come from parts never trained for that", stacklevel=4)
        module = None
        if isinstance(task, SampleTask):
            module = task.build(self.model).to(self.device).eval()
            head = [k for k in module.state_dict() if k.startswith(task.head_prefixes)] if task.head_prefixes else []
            lacking = [k for k in head if k not in ckpt.head]
            if lacking:
                raise ValueError(f"{ckpt.path} holds a '{name}' head without '{lacking[0]}': re-export the fine-tuning")
            module.load_state_dict({k: ckpt.head[k] for k in head}, strict=False)
        self._tasks[name] = task, module
        return task, module

    def _data(self, task: FinetuneTask):
        """The task's evaluation data config at this model's geometry, as the run's evaluation built it."""
        return task_data_config(self.settings, self.checkpoint.model_cfg, task, False,
                                list(self.settings.data.pipeline.sources))


def load(path: str | Path, config: str | Path | None = None, overrides: Sequence[str] = (),
         device: str | torch.device | None = None, batch_size: int | None = None) -> Predictor:
    """A ``Predictor`` for the checkpoint at ``path`` (export, converted release or run directory).

    ``config``: the fine-tuning config to predict with (a name such as ``vqa_base``, or a YAML path; default: the
    config of the run that made the checkpoint), ``overrides``: ``key=value`` changes of it
    (``task.options.num_beams=3``); ``device`` defaults to the GPU when there is one, ``batch_size`` to the
    config's ``eval.batch_size``.
    """
    checkpoint = read_checkpoint(path)
    settings = run_settings(config if config is not None else checkpoint.run_config, overrides)
    return Predictor(checkpoint, settings, device, batch_size)
