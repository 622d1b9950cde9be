"""NLVR2 and SNLI-VE: the heads, label names, accuracy and baseline, shard checks (exact 2-rank evaluation:
tests/tasks/test_task_evaluation_runs.py)."""
import json

import pytest
import torch

from mplug_ds.data.formats import ReaderArgs, read_format
from mplug_ds.data.formats.common import Skip
from mplug_ds.data.tokenizer import get_tokenizer
from mplug_ds.eval.classification import classification_accuracy, majority_baseline, text_only_baseline
from mplug_ds.models.mplug import build_model
from mplug_ds.tasks import build_task
from mplug_ds.tasks.cli import EXIT_CONFIG_ERROR, main
from mplug_ds.tasks.nlvr2 import NLVR2Model
from tests.data.shard_utils import jpeg_bytes, write_caption_shards, write_manifest
from tests.tasks.classification_data import write_ve_shards
from tests.tasks.task_data import shard_overrides, write_export


def _pair_batch(texts, seed):
    g = torch.Generator().manual_seed(seed)
    ids = get_tokenizer()(texts, padding="longest", return_tensors="pt")
    return {"image0": torch.randn(len(texts), 3, 64, 64, generator=g),
            "image1": torch.randn(len(texts), 3, 64, 64, generator=g),
            "text_ids": ids["input_ids"], "text_mask": ids["attention_mask"]}


def test_nlvr2_fuses_each_image_alone_and_its_head_knows_left_from_right():
    torch.manual_seed(0)
    model = NLVR2Model(build_model("tiny")).eval()
    batch = _pair_batch(["the left image contains a red circle", "both images contain a square"], seed=1)
    swapped = dict(batch, image0=batch["image1"], image1=batch["image0"])
    with torch.no_grad():
        states, states_swapped = model.pair_states(batch), model.pair_states(swapped)
        other_right = model.pair_states(dict(batch, image1=torch.zeros_like(batch["image1"])))
        logits, logits_swapped = model.logits(batch), model.logits(swapped)
    # each image is fused with the statement on its own: swapping the pair swaps the states exactly …
    assert torch.allclose(states_swapped, states.flip(1), atol=1e-6)
    assert torch.allclose(other_right[:, 0], states[:, 0], atol=1e-6)  # … and the right image never reaches the left
    # … while the head reads them in order ("the left image …" must not be answered like "the right image …")
    assert logits.shape == (2, 2) and not torch.allclose(logits, logits_swapped, atol=1e-4)


def test_label_strings_map_to_the_reported_class_names(tmp_path):
    images = tmp_path / "flickr30k-images"
    images.mkdir()
    (images / "7.jpg").write_bytes(jpeg_bytes())
    rows = [{"Flickr30K_ID": "7", "pairID": f"7.jpg#0r1{g[0] if g != '-' else 'x'}", "gold_label": g,
             "sentence1": "a dog", "sentence2": f"hypothesis {g}"}
            for g in ("entailment", "neutral", "contradiction", "-")]
    ann = tmp_path / "snli_ve_dev.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = list(read_format("snli-ve", ReaderArgs(ann=[ann], images=tmp_path)))
    samples, skips = out[:3], out[3:]
    assert [s.label for s in samples] == [2, 1, 0] and all(s.split == "dev" for s in samples)
    names = build_task("ve").label_names
    assert [names[s.label] for s in samples] == ["entailment", "neutral", "contradiction"]
    assert len(skips) == 1 and isinstance(skips[0], Skip) and "'-'" in skips[0].reason
    assert build_task("nlvr2").label_names == ("False", "True")


def test_accuracy_per_split_and_majority_baseline():
    preds = [{"pred": 1, "label": 1, "split": "dev"}, {"pred": 0, "label": 1, "split": "dev"},
             {"pred": 2, "label": 2, "split": "test"}, {"pred": 1, "label": 1, "split": "test"},
             {"pred": 0, "label": 1, "split": "test"}]
    metrics = classification_accuracy(preds)
    assert metrics["acc"] == pytest.approx(3 / 5) and metrics["num_samples"] == 5
    assert metrics["acc/dev"] == 0.5 and metrics["acc/test"] == pytest.approx(2 / 3)
    assert majority_baseline(preds) == {"acc": pytest.approx(4 / 5)}  # always "1"
    task = build_task("ve")
    assert task.format_metric(metrics, majority_baseline(preds)).startswith("acc: 0.6000 vs majority class 0.8000")


def test_shards_without_the_task_fields_fail_before_training(single_process_env, capsys, tmp_path):
    export = str(write_export(tmp_path / "export"))
    ve = write_ve_shards(tmp_path / "ve", "v", [3], ["dev"])
    captions, _ = write_caption_shards(tmp_path / "captions", "cap", 1, 3)
    write_manifest(tmp_path / "captions", {"cap-000000.tar": 3})
    assert main(["--task", "nlvr2", "--pretrained", export, *shard_overrides(ve, ve)]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert f"sample 'v_00000' of {tmp_path / 've' / 'v-000000.tar'} has no images" in err
    assert "--format nlvr2" in err
    assert main(["--task", "ve", "--pretrained", export, *shard_overrides(captions, captions)]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert "sample 'cap_000_000'" in err and "has no label" in err and "--format snli-ve" in err
    assert main(["--task", "ve", "--evaluate", "--pretrained", export, *shard_overrides(ve, ve)]) == EXIT_CONFIG_ERROR
    assert "evaluating task 've' needs its trained head (head.*)" in capsys.readouterr().err


def test_text_only_baseline_answers_each_text_with_its_training_label():
    predictions = [{"text": "the circle is red", "label": 2}, {"text": "the circle is red", "label": 0},
                   {"text": "a child drew it", "label": 1}, {"text": "never seen", "label": 0},
                   {"text": "never seen", "label": 2}]
    label_of_text = {"the circle is red": 2, "a child drew it": 1}
    assert text_only_baseline(predictions, label_of_text, fallback=0) == {"text_only": 3 / 5}
    assert text_only_baseline(predictions, label_of_text, fallback=None) == {}
