"""VQA and captioning evaluated by launch/finetune.py on 1 and 2 ranks (gloo, tiny model, odd-sized sets): the same
predictions, metrics and result files."""
import json

import pytest

from tests.engine.engine_runs import run
from tests.tasks.predict_checks import assert_predictor_matches
from tests.tasks.task_data import (assert_predictions_picture, shard_overrides, write_export, write_retrieval_shards,
                                   write_vqa_shards)
from tests.tasks.test_finetune_runs import finetune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("generative_data")
    return {"export": write_export(root / "export"),
            "vqa": write_vqa_shards(root / "vqa", "v", [4, 3]),
            "caption": write_retrieval_shards(root / "caption", "c", [4, 3])}


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_evaluation_on_two_ranks_equals_one_rank_on_an_odd_set(data, tmp_path, task):
    options = ["task.options.max_length=4", "task.options.min_length=1"]
    args = ["--task", task, "--evaluate", "--pretrained", str(data["export"]),
            *shard_overrides(data[task], data[task]), "eval.batch_size=2", *options]
    results, server = {}, {}
    for ranks in (1, 2):
        out = tmp_path / str(ranks)
        output = run(finetune(out, args, ranks), seconds=900)
        results[ranks] = json.loads((out / "eval" / "evaluate.json").read_text())
        name = "vqa_results" if task == "vqa" else "captions"
        server[ranks] = json.loads((out / "eval" / f"evaluate.{name}.json").read_text())
        assert f"=== {task} evaluation ===" in output
        assert_predictions_picture(output, out / "eval" / "evaluate.png")
    one, two = results[1], results[2]
    assert one["metrics"] == two["metrics"] and one["baseline"] == two["baseline"]
    evaluated = tmp_path / "1" / "eval" / "evaluate.json"
    assert_predictor_matches(task, data["export"], evaluated, data[task], evaluated.with_suffix(".config.yaml"))
    assert server[1] == server[2] == one["results"]
    if task == "vqa":
        assert one["metrics"]["num_scored"] == 7
        assert [r["question_id"] for r in server[1]] == list(range(1000, 1007))
        assert {"acc", "acc/other", "acc/yes/no", "acc/number"} <= set(one["metrics"])
        assert 0 < one["baseline"]["acc"] <= 100
    else:
        assert one["metrics"]["num_images"] == 7
        assert [r["image_id"] for r in server[1]] == [f"img_{n}" for n in range(7)]
        assert {"bleu_1", "bleu_4", "meteor", "rouge_l", "cider"} <= set(one["metrics"])
        assert one["baseline"]["cider"] > 0
