"""VQA and captioning task modules in one process (tiny model, tiny real shards): the weighted answer loss, both VQA
answer modes, the caption evaluation's COCO results and baselines."""
import json

import pytest
import torch

from mplug_ds.data.collate import Preparer, collate_vqa
from mplug_ds.data.data_config import DataConfig, SourceConfig
from mplug_ds.data.reading import iter_samples
from mplug_ds.models.mplug import build_model
from mplug_ds.tasks import build_task
from tests.tasks.task_data import write_retrieval_shards, write_vqa_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa_caption")
    return {"vqa": write_vqa_shards(root / "vqa", "v", [4, 3]),
            "caption": write_retrieval_shards(root / "caption", "c", [4, 3]), "root": root}


def _data(task, shards, train=False):
    return DataConfig(task=task, train=train, image_res=64, patch_size=16, max_len=16,
                      sources=[SourceConfig("train", shards[task])], scale_min=1.0, augment=False)


def test_vqa_loss_is_the_weighted_summed_answer_nll_per_question(shards):
    import random

    torch.manual_seed(0)
    module = build_task("vqa").build(build_model("tiny")).eval()
    prepare = Preparer(_data("vqa", shards, train=True))
    items = [prepare(s, random.Random(0)) for s in iter_samples(shards["vqa"])][:4]
    batch = {k: v for k, v in collate_vqa(items, 16).items() if isinstance(v, torch.Tensor)}
    assert batch["answer_counts"].tolist() == [2, 2, 2, 1]
    with torch.no_grad():
        loss = module(batch)["loss"]
        expected = 0.0
        for it in items:  # one question at a time: Σ weight · Σ token NLL of "answer [SEP]"
            single = {k: v for k, v in collate_vqa([it], 16).items() if isinstance(v, torch.Tensor)}
            memory, mask = module.memory(module.visual(single), single["question_ids"], single["question_mask"])
            for j, weight in enumerate(it["weights"]):
                nll, _ = module.model.decoder.token_nll(single["answer_ids"][j:j + 1], single["answer_mask"][j:j + 1],
                                                        memory, mask)
                expected += weight * nll.sum().item()
    assert loss.item() == pytest.approx(expected / 4, rel=1e-5)


@pytest.mark.parametrize("mode", ["generate", "rank"])
def test_vqa_evaluation_answers_every_question_in_server_format(shards, mode, tmp_path):
    options = {"mode": mode, "max_length": 4}
    if mode == "rank":
        (tmp_path / "answers.json").write_text(json.dumps(["red", "green", "blue", "yes", "no", "1"]))
        options |= {"answer_list": str(tmp_path / "answers.json"), "k_test": 3}
    task = build_task("vqa", options)
    torch.manual_seed(0)
    module = task.build(build_model("tiny")).eval()
    samples = list(enumerate(iter_samples(shards["vqa"])))
    result = task.evaluate(module, samples, _data("vqa", shards), batch_size=3, device=torch.device("cpu"))
    assert [r["question_id"] for r in result.results] == list(range(1000, 1007))
    assert set(result.results[0]) == {"question_id", "answer"}
    if mode == "rank":
        assert all(r["answer"] in {"red", "green", "blue", "yes", "no", "1"} for r in result.results)
    assert result.metrics["num_scored"] == 7 and 0 <= result.metrics["acc"] <= 100
    # baseline: the most frequent training answer, weighted by annotator share: "1" (2.0: the two count questions,
    # "one" normalised into it) ahead of "blue" (1.8); it scores 1 on those two questions, 0 on the other five
    assert "'1'" in task.format_metric(result.metrics, result.baseline)
    assert result.baseline["acc"] == pytest.approx(100 * 2 / 7)


def test_caption_evaluation_writes_coco_results_and_beats_nothing_silently(shards):
    task = build_task("caption", {"max_length": 6, "min_length": 2, "spice": True})
    torch.manual_seed(0)
    module = task.build(build_model("tiny")).eval()
    samples = list(enumerate(iter_samples(shards["caption"])))
    result = task.evaluate(module, samples, _data("caption", shards), batch_size=4, device=torch.device("cpu"))
    assert [r["image_id"] for r in result.results] == [f"img_{n}" for n in range(7)]
    assert all(isinstance(r["caption"], str) for r in result.results)
    assert {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"} <= set(result.metrics)
    line = task.format_metric(result.metrics, result.baseline)
    assert "constant caption" in line and result.baseline["cider"] > 0
    if "spice" not in result.metrics:
        assert "SPICE unavailable" in line
