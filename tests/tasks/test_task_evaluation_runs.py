"""Exact distributed evaluation of every task through ``launch/finetune.py`` (tiny model, odd-sized sets of 7).

Two launches serve all tasks (tests/tasks/run_jobs.py runs many command lines per process): first 2 ranks evaluate
grounding, retrieval, VQA and captioning from a random export and train NLVR2 and SNLI-VE one step (evaluating
after it); then 1 rank evaluates the same four from the export, the two classifiers from their 2-rank training
checkpoints and from exports of those checkpoints. Each task's test compares the 1-rank and 2-rank results.
"""
import json
import sys

import pytest

from mplug_ds.config import ConfigError
from mplug_ds.tasks import build_task
from mplug_ds.tasks.pretrained import check_task_weights
from tests.engine.engine_runs import REPO, launch, run
from tests.tasks.classification_data import write_nlvr2_shards, write_ve_shards
from tests.tasks.predict_checks import assert_predictor_matches
from tests.tasks.task_data import (assert_predictions_picture, shard_overrides, write_export, write_grounding_shards,
                                   write_retrieval_shards, write_vqa_shards)
from tools.export_checkpoint import main as export_main

pytestmark = pytest.mark.slow

RUN_JOBS = REPO / "tests" / "tasks" / "run_jobs.py"
EVALUATED = ("grounding", "retrieval", "vqa", "caption")
CLASSIFIERS = ("nlvr2", "ve")
OPTIONS = {"grounding": ["task.options.loss_weighting=true"], "retrieval": ["task.options.k_test=10"],
           "vqa": ["task.options.max_length=4", "task.options.min_length=1"],
           "caption": ["task.options.max_length=4", "task.options.min_length=1"]}


def _run_jobs(path, jobs, ranks):
    path.write_text(json.dumps(jobs))
    command = [sys.executable, str(RUN_JOBS), str(path)] if ranks == 1 else launch(RUN_JOBS, [path], ranks)
    output = run(command, seconds=900)
    parts = output.split("=== job ")[1:]
    return {part.split(" ===", 1)[0]: part for part in parts}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_eval")
    export = write_export(root / "export")
    shards = {"grounding": write_grounding_shards(root / "grounding", "g", [4, 3], ["val", "testA", "testB"]),
              "retrieval": write_retrieval_shards(root / "retrieval", "r", [4, 3]),
              "vqa": write_vqa_shards(root / "vqa", "v", [4, 3]),
              "caption": write_retrieval_shards(root / "caption", "c", [4, 3]),
              "nlvr2": write_nlvr2_shards(root / "nlvr2", "nlvr2", [4, 3], ["dev", "test"]),
              "ve": write_ve_shards(root / "ve", "ve", [4, 3], ["dev", "test"])}

    def job(task, out, *args):
        return [task, ["--task", task, *shard_overrides(shards[task], shards[task]), "eval.batch_size=2",
                       *OPTIONS.get(task, []), *args, f"run.output_dir={out}", "logging.progress_bar=false"]]

    two = [job(t, root / "2" / t, "--evaluate", "--pretrained", str(export)) for t in EVALUATED]
    two += [job(t, root / "trained" / t, "--pretrained", str(export), "schedule.total_steps=1",
                "schedule.warmup_steps=1", "batch.micro_batch_per_gpu=2", "optim.lr=1e-2") for t in CLASSIFIERS]
    logs = {2: _run_jobs(root / "two.json", two, 2)}
    for task in CLASSIFIERS:
        assert export_main([str(root / "trained" / task), "--out", str(root / "export_trained" / task)]) == 0
    one = [job(t, root / "1" / t, "--evaluate", "--pretrained", str(export)) for t in EVALUATED]
    one += [job(t, root / "1" / t, "--evaluate", "--pretrained", str(root / "trained" / t)) for t in CLASSIFIERS]
    one += [[f"{t}_export", job(t, root / "from_export" / t, "--evaluate", "--pretrained",
                                str(root / "export_trained" / t))[1]] for t in CLASSIFIERS]
    logs[1] = _run_jobs(root / "one.json", one, 1)
    return {"root": root, "export": export, "logs": logs, "shards": shards}


def _result(runs, ranks, task, name="evaluate.json"):
    return json.loads((runs["root"] / str(ranks) / task / "eval" / name).read_text())


def _both(runs, task):
    for ranks in (1, 2):
        assert_predictions_picture(runs["logs"][ranks][task], runs["root"] / str(ranks) / task / "eval" / "evaluate.png")
    one, two = _result(runs, 1, task), _result(runs, 2, task)
    assert one["metrics"] == two["metrics"] and one["baseline"] == two["baseline"]
    evaluated = runs["root"] / "1" / task / "eval" / "evaluate.json"  # mplug_ds.load predicts what it wrote
    assert_predictor_matches(task, runs["export"], evaluated, runs["shards"][task], evaluated.with_suffix(".config.yaml"))
    return one, two


def test_grounding_on_two_ranks_equals_one_rank(runs):
    one, two = _both(runs, "grounding")
    assert one["metrics"]["num_samples"] == 7
    assert [p["index"] for p in two["results"]] == list(range(7))
    assert [p["pred_box"] for p in one["results"]] == [p["pred_box"] for p in two["results"]]
    assert {p["split"] for p in two["results"]} == {"val", "testA", "testB"}
    assert all(k in one["metrics"] for k in ("acc/val", "acc/testA", "acc/testB"))
    metrics = [json.loads(line) for line in (runs["root"] / "1" / "grounding" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["event"] == "eval" and metrics[-1]["checkpoint"] == str(runs["export"])


def test_retrieval_on_two_ranks_equals_one_rank(runs):
    one, two = _both(runs, "retrieval")
    assert one["metrics"]["num_images"] == 7
    assert one["results"]["text_to_image"] == two["results"]["text_to_image"]
    assert len(two["results"]["text_to_images"]) == 13  # 7 images with 1, 2, 3, 1, 2, 3, 1 captions
    assert one["results"]["image_index"] == two["results"]["image_index"] == list(range(7))
    assert one["results"]["texts"] == two["results"]["texts"] and len(one["results"]["texts"]) == 13
    for key in ("image_to_texts", "text_to_images"):  # same candidates, same order; scores up to batching
        for row_one, row_two in zip(one["results"][key], two["results"][key]):
            assert [c for c, _ in row_one] == [c for c, _ in row_two]
            assert [s for _, s in row_one] == pytest.approx([s for _, s in row_two], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_generation_on_two_ranks_equals_one_rank(runs, task):
    one, _ = _both(runs, task)
    name = "vqa_results" if task == "vqa" else "captions"
    server = [_result(runs, ranks, task, f"evaluate.{name}.json") for ranks in (1, 2)]
    assert server[0] == server[1] == one["results"]
    assert f"=== {task} evaluation ===" in runs["logs"][1][task]
    if task == "vqa":
        assert one["metrics"]["num_scored"] == 7
        assert [r["question_id"] for r in server[0]] == list(range(1000, 1007))
        assert {"acc", "acc/other", "acc/yes/no", "acc/number"} <= set(one["metrics"])
        assert 0 < one["baseline"]["acc"] <= 100
    else:
        assert one["metrics"]["num_images"] == 7
        assert [r["image_id"] for r in server[0]] == [f"img_{n}" for n in range(7)]
        assert {"bleu_1", "bleu_4", "meteor", "rouge_l", "cider"} <= set(one["metrics"])
        assert one["baseline"]["cider"] > 0


@pytest.mark.parametrize("task", CLASSIFIERS)
def test_classifier_trained_on_two_ranks_evaluates_alike_on_one_and_from_its_export(runs, task):
    """One training step on 2 ranks, evaluated there; again from its checkpoint and from its export on 1 rank."""
    assert_predictions_picture(runs["logs"][1][task], runs["root"] / "1" / task / "eval" / "evaluate.png")
    two = json.loads((runs["root"] / "trained" / task / "eval" / "step_00000001.json").read_text())
    one = _result(runs, 1, task)
    assert one["metrics"] == two["metrics"] and one["metrics"]["num_samples"] == 7
    assert {"acc/dev", "acc/test"} <= set(one["metrics"])
    assert one["baseline"] == two["baseline"]
    assert one["baseline"]["acc"] == pytest.approx((4 if task == "nlvr2" else 3) / 7)
    assert 0 <= one["baseline"]["text_only"] <= 1  # from the training shards' labels
    assert [p["index"] for p in two["results"]] == list(range(7))
    assert [p["pred"] for p in one["results"]] == [p["pred"] for p in two["results"]]
    for p_one, p_two in zip(one["results"], two["results"]):  # the trained head was loaded, not re-initialised
        assert p_one["probs"] == pytest.approx(p_two["probs"], abs=1e-5)
    names = build_task(task).label_names
    assert [p["truth"] for p in two["results"]] == [names[i % len(names)] for i in range(7)]
    # Its export carries the head: evaluating the export gives the same predictions; another task refuses it.
    exported = json.loads((runs["root"] / "from_export" / task / "eval" / "evaluate.json").read_text())
    assert exported["metrics"] == one["metrics"]
    for p_export, p_one in zip(exported["results"], one["results"]):
        assert p_export["probs"] == pytest.approx(p_one["probs"], abs=1e-6)
    other = "ve" if task == "nlvr2" else "nlvr2"
    with pytest.raises(ConfigError, match=f"no '{other}' head: its task.safetensors is of task '{task}'"):
        check_task_weights(runs["root"] / "export_trained" / task, other, build_task(other).head_prefixes)
    evaluated = runs["root"] / "1" / task / "eval" / "evaluate.json"
    for checkpoint in (runs["root"] / "export_trained" / task, runs["root"] / "trained" / task):
        assert_predictor_matches(task, checkpoint, evaluated, runs["shards"][task])  # an export, a run directory
