"""The check the task runs share: ``mplug_ds.load`` predicts, on an evaluation's own images, what that evaluation
wrote (captions, answers, boxes, labels, retrieval order)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import mplug_ds
from mplug_ds.data.reading import iter_samples


def assert_predictor_matches(task: str, checkpoint: Path, results_file: Path, shards: str,
                             config: Path | None = None) -> None:
    """``mplug_ds.load(checkpoint, config)`` on the samples of ``shards``, in order, gives the predictions of the
    evaluation whose results file is ``results_file`` (evaluated in one process, same batch size)."""
    results = json.loads(results_file.read_text())["results"]
    samples = list(iter_samples(shards))
    predictor = mplug_ds.load(checkpoint, config)
    images, texts = [s.image for s in samples], [s.texts[0] for s in samples]
    if task == "caption":
        assert predictor.caption(images) == [r["caption"] for r in results]
    elif task == "vqa":
        assert predictor.answer(images, texts) == [r["answer"] for r in results]
    elif task == "grounding":
        assert predictor.ground(images, texts) == [r["pred_box"] for r in results]
    elif task == "retrieval":
        ranking = predictor.rank(images, [t for s in samples for t in s.texts])  # by image, then caption
        for key in ("image_to_texts", "text_to_images"):
            for ours, theirs in zip(getattr(ranking, key), results[key], strict=True):
                assert [c for c, _ in ours] == [c for c, _ in theirs], key
                assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], abs=1e-6), key
    else:
        inputs = [tuple(s.images) for s in samples] if task == "nlvr2" else images
        labels = predictor.classify(inputs, texts)
        assert [p["label"] for p in labels] == [r["answer"] for r in results]
        # Bit-equal only with the same thread count (this process runs after tests that change it): a tolerance.
        gap = max(abs(a - b) for p, r in zip(labels, results, strict=True)
                  for a, b in zip(p["probs"].values(), r["probs"], strict=True))
        assert gap <= 1e-4, f"{task}: class probabilities differ from the evaluation's by up to {gap:.2e}"
