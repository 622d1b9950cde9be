"""Real fine-tuning runs of launch/finetune.py (tiny model, tiny task shards, gloo on CPU).

Exact distributed evaluation (1 rank vs 2 ranks on an odd-sized set), kill -9 then ``--resume auto`` with
identical per-step losses, periodic evaluation with best-checkpoint selection, resume on another number of ranks.
"""
import json
import sys

import pytest

from mplug_ds.data.demo_shards import world_dir
from mplug_ds.engine.checkpoint import COMPLETE, tag_for
from mplug_ds.runtime.launch_env import free_port
from tests.engine.engine_runs import DEEPSPEED, REPO, records, run, step_losses
from tests.processes import started, wait_for
from tests.tasks.predict_checks import assert_predictor_matches
from tests.tasks.task_data import (assert_predictions_picture, shard_overrides, write_export, write_grounding_shards,
                                   write_retrieval_shards)

FINETUNE = REPO / "launch" / "finetune.py"
pytestmark = pytest.mark.slow


def finetune(out, args, ranks):
    """``python launch/finetune.py`` (1 rank) or ``deepspeed --num_gpus N launch/finetune.py``."""
    head = [sys.executable] if ranks == 1 else [str(DEEPSPEED), "--master_port", str(free_port()), "--num_gpus",
                                                 str(ranks)]
    return [*head, str(FINETUNE), *args, f"run.output_dir={out}", "logging.progress_bar=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_data")
    return {"export": write_export(root / "export"),
            "grounding": write_grounding_shards(root / "grounding", "g", [4, 3], ["val", "testA", "testB"]),
            "retrieval": write_retrieval_shards(root / "retrieval", "r", [4, 3]),
            "retrieval_train": write_retrieval_shards(root / "retrieval_train", "rt", [12, 12], seed=1)}


def _eval(out):
    return [r for r in records(out) if r["event"] == "eval"][-1]


@pytest.mark.parametrize("task", ["grounding", "retrieval"])
def test_evaluation_on_two_ranks_equals_one_rank_on_an_odd_set(data, tmp_path, task):
    args = ["--task", task, "--evaluate", "--pretrained", str(data["export"]),
            *shard_overrides(data[task], data[task]), "eval.batch_size=2", "task.options.k_test=10"
            if task == "retrieval" else "task.options.loss_weighting=true"]
    results = {}
    for ranks in (1, 2):
        output = run(finetune(tmp_path / str(ranks), args, ranks), seconds=900)
        results[ranks] = json.loads((tmp_path / str(ranks) / "eval" / "evaluate.json").read_text())
        assert_predictions_picture(output, tmp_path / str(ranks) / "eval" / "evaluate.png")
    one, two = results[1], results[2]
    assert one["metrics"] == two["metrics"] and one["metrics"]["num_samples" if task == "grounding" else "num_images"] == 7
    assert _eval(tmp_path / "1")["checkpoint"] == str(data["export"])
    evaluated = tmp_path / "1" / "eval" / "evaluate.json"
    assert_predictor_matches(task, data["export"], evaluated, data[task], evaluated.with_suffix(".config.yaml"))
    if task == "grounding":
        assert [p["index"] for p in two["results"]] == list(range(7))
        assert [p["pred_box"] for p in one["results"]] == [p["pred_box"] for p in two["results"]]
        assert {p["split"] for p in two["results"]} == {"val", "testA", "testB"}
        assert all(k in one["metrics"] for k in ("acc/val", "acc/testA", "acc/testB"))
    else:
        assert one["results"]["text_to_image"] == two["results"]["text_to_image"]
        assert len(two["results"]["text_to_images"]) == 13  # 7 images with 1, 2, 3, 1, 2, 3, 1 captions
        assert one["results"]["image_index"] == two["results"]["image_index"] == list(range(7))
        assert one["results"]["texts"] == two["results"]["texts"] and len(one["results"]["texts"]) == 13
        for key in ("image_to_texts", "text_to_images"):  # same candidates, same order; scores up to batching
            for row_one, row_two in zip(one["results"][key], two["results"][key]):
                assert [c for c, _ in row_one] == [c for c, _ in row_two]
                assert [s for _, s in row_one] == pytest.approx([s for _, s in row_two], rel=1e-4, abs=1e-5)


RESUME = ["--task", "retrieval", "run.deterministic=true", "schedule.total_steps=6", "schedule.warmup_steps=1",
          "checkpoint.every_steps=2", "checkpoint.keep_last=6", "batch.micro_batch_per_gpu=4",
          "task.options.queue_size=16", "task.options.k_test=10", "eval.every_steps=3", "eval.batch_size=4",
          "optim.lr=1e-3", "optim.visual_lr=1e-3", "deepspeed.precision=fp32", "deepspeed.config=zero3"]


def test_kill9_then_resume_gives_identical_losses_and_best_checkpoint(data, tmp_path):
    args = RESUME + ["--pretrained", str(data["export"]),
                     *shard_overrides(data["retrieval_train"], data["retrieval"])]
    reference = tmp_path / "reference"
    output = run(finetune(reference, args, 2), seconds=900)
    eval_lines = [line for line in output.splitlines() if line.startswith("eval at step ")]
    assert len(eval_lines) == 1 and eval_lines[0].startswith("eval at step 3: ") and " r_mean " in eval_lines[0]
    marker = tmp_path / "killed" / "checkpoints" / tag_for(2) / COMPLETE
    with started(finetune(tmp_path / "killed", args, 2)) as proc:  # leaving the block SIGKILLs the whole group
        wait_for(marker.exists, 900, proc, "a complete checkpoint at step 2")
    run(finetune(tmp_path / "killed", args + ["--resume", "auto"], 2), seconds=900)
    resume = [r for r in records(tmp_path / "killed") if r["event"] == "resume"][-1]
    assert 2 <= resume["step"] < 6
    resumed, expected = step_losses(tmp_path / "killed", after_resume=True), step_losses(reference)
    assert sorted(resumed) == list(range(resume["step"] + 1, 7))
    for step, rec in resumed.items():
        for key in ("loss", "loss_ita", "loss_itm", "lr"):
            assert rec[key] == expected[step][key], f"step {step} {key}: {rec[key]} != {expected[step][key]}"
    evals = [r for r in records(reference) if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6] and all("r_mean" in r and "baseline/r_mean" in r for r in evals)
    best = json.loads((reference / "checkpoints" / "best.json").read_text())
    assert best["metric"] == "r_mean" and best["value"] == max(r["r_mean"] for r in evals)
    assert (reference / "checkpoints" / best["tag"] / COMPLETE).exists()
    assert (reference / "eval" / f"step_{6:08d}.json").exists()


def test_task_only_makes_the_demo_checkpoint_then_fine_tunes_and_reports(tmp_path):
    """`launch/finetune.py --task grounding` with a cut-down demo: the pre-training checkpoint is made first."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    demo_pretrain = "[schedule.total_steps=2, schedule.warmup_steps=1, checkpoint.every_steps=2, eval.retrieval=false]"
    output = run(finetune(out, ["--task", "grounding", f"data.cache_dir={cache}", f"task.demo_pretrain={demo_pretrain}",
                                "schedule.total_steps=2", "schedule.warmup_steps=1", "eval.max_samples=12",
                                "batch.micro_batch_per_gpu=4"], 2), seconds=900)
    assert (world_dir(cache) / "pretrained" / "model.safetensors").exists()
    assert "loaded" in output and str(world_dir(cache) / "pretrained") in output  # the load report
    report = output[output.index("=== grounding evaluation ==="):]
    assert "acc (Acc@IoU≥0.5)" in report and "best trivial box" in report
    results = json.loads(next((out / "eval").glob("step_*.json")).read_text())
    assert len(results["results"]) == 12 and all(len(p["pred_box"]) == 4 for p in results["results"])
    assert_predictions_picture(output, out / "eval" / "step_00000002.png")
    assert f"plot: {out / 'curves.png'}" in output and (out / "curves.png").stat().st_size > 10_000


def test_fine_tuning_resumes_on_another_number_of_ranks(data, tmp_path):
    """Retrieval (momentum teacher, feature queue) for 2 steps on 2 ranks under ZeRO-3, then ``--resume auto`` on one
    rank to step 4: the universal conversion carries the state, the global batch is kept (accumulation 2), and the
    steps after the resume are logged once each."""
    args = [a for a in RESUME if not a.startswith(("schedule.total_steps", "eval.every_steps"))] + [
        "eval.every_steps=4", "--pretrained", str(data["export"]),
        *shard_overrides(data["retrieval_train"], data["retrieval"])]
    out = tmp_path / "run"
    run(finetune(out, args + ["schedule.total_steps=2"], 2), seconds=900)
    output = run(finetune(out, args + ["schedule.total_steps=4", "--resume", "auto"], 1), seconds=900)
    resume = [r for r in records(out) if r["event"] == "resume"]
    assert len(resume) == 1 and (resume[0]["step"], resume[0]["world_size"]) == (2, 1), resume
    steps = step_losses(out, after_resume=True)
    assert sorted(steps) == [3, 4] and [steps[s]["samples"] for s in (3, 4)] == [3 * 8, 4 * 8]
    assert "=== retrieval evaluation ===" in output
