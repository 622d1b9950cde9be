"""One evaluation of a task: read this rank's share of the evaluation shards, evaluate, write the results file."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from mplug_ds.data.data_config import DataConfig
from mplug_ds.data.reading import DataErrors
from mplug_ds.distributed import get_rank
from mplug_ds.runtime.atomic import atomic_write_text
from mplug_ds.eval.distributed import read_eval_samples
from mplug_ds.eval.pictures import draw_panels
from mplug_ds.tasks.base import EvalResult, EvalSamples, FinetuneTask

SHOWN = 8  # samples in an evaluation's picture
log = logging.getLogger(__name__)


def run_evaluation(task: FinetuneTask, module: nn.Module, shards: str, data: DataConfig, batch_size: int,
                   max_samples: int | None, device: torch.device, results_path: Path | None = None) -> EvalResult:
    """Evaluate ``module`` on ``shards`` (every sample once over all ranks; a collective).

    Rank 0 gets the metrics, the baseline and, when ``results_path`` is given, writes the results JSON there
    (and, for tasks with a ``results_name``, the bare results beside it) and a picture of the first samples with
    their predictions beside it (``.png``; ``result.picture``).
    """
    errors = DataErrors()
    samples = list(read_eval_samples(shards, max_samples, errors=errors))
    was_training = module.training
    module.eval()
    try:
        result = task.evaluate(module, samples, data, batch_size, device)
    finally:
        module.train(was_training)
    if get_rank() == 0:
        result.metrics["corrupt_samples"] = float(errors.corrupt_samples)
        if results_path is not None:
            results_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(results_path, json.dumps({"task": task.name, "metrics": result.metrics,
                                                        "baseline": result.baseline, "results": result.results}))
            if task.results_name:  # the results alone, in the format an evaluation server takes
                atomic_write_text(results_path.with_suffix(f".{task.results_name}.json"), json.dumps(result.results))
            try:  # a picture that cannot be drawn must not end the run
                result.picture = draw_predictions(task, samples, result.predictions, results_path.with_suffix(".png"))
            except Exception as err:  # reported: the evaluation itself succeeded
                log.warning("the picture of the predictions was not written (%s: %s)", type(err).__name__, err)
    return result


def draw_predictions(task: FinetuneTask, samples: EvalSamples, predictions: list[dict], out: Path,
                     title: str | None = None) -> Path | None:
    """``SHOWN`` of this rank's evaluated samples, evenly spaced through them, with their predictions as a PNG at
    ``out`` (``None`` when the task draws no panels) under ``title`` (default: which samples they are)."""
    by_index = {p["index"]: p for p in predictions if "index" in p}
    chosen = samples[::max(1, len(samples) // SHOWN)][:SHOWN]
    panels = [task.panel(sample, by_index[index]) for index, sample in chosen if index in by_index]
    panels = [panel for panel in panels if panel is not None]
    if not panels:
        return None
    title = title or f"{task.name}: {len(panels)} evaluated samples, evenly spaced ({out.stem})"
    return draw_panels(panels, out, title)
