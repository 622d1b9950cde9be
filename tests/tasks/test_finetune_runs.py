"""Real fine-tuning runs of launch/finetune.py (tiny model, tiny task shards, gloo on CPU).

Periodic evaluation with best-checkpoint selection, a resume with identical per-step losses and one on another
number of ranks (sharing one 2-rank run), and the task-only demo that makes its pre-training checkpoint first.
"""
import json
import shutil
import sys

import pytest

from mplug_ds.data.demo_shards import world_dir
from mplug_ds.engine.checkpoint import COMPLETE, tag_for
from tests.engine.engine_runs import REPO, launch, records, run, step_losses
from tests.tasks.task_data import (assert_predictions_picture, shard_overrides, write_export,
                                   write_retrieval_shards)

FINETUNE = REPO / "launch" / "finetune.py"
pytestmark = pytest.mark.slow


def finetune(out, args, ranks):
    """``python launch/finetune.py`` (1 rank) or the script on N ranks (``tests.engine.engine_runs.launch``)."""
    tail = [*args, f"run.output_dir={out}", "logging.progress_bar=false"]
    return [sys.executable, str(FINETUNE), *tail] if ranks == 1 else launch(FINETUNE, tail, ranks)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_data")
    return {"export": write_export(root / "export"),
            "retrieval": write_retrieval_shards(root / "retrieval", "r", [4, 3]),
            "retrieval_train": write_retrieval_shards(root / "retrieval_train", "rt", [12, 12], seed=1)}


RESUME = ["--task", "retrieval", "run.deterministic=true", "schedule.total_steps=6", "schedule.warmup_steps=1",
          "checkpoint.every_steps=2", "checkpoint.keep_last=6", "batch.micro_batch_per_gpu=4",
          "task.options.queue_size=16", "task.options.k_test=10", "eval.every_steps=3", "eval.batch_size=4",
          "optim.lr=1e-3", "optim.visual_lr=1e-3", "deepspeed.precision=fp32", "deepspeed.config=zero3"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Retrieval (momentum teacher, feature queue) under ZeRO-3 on 2 ranks for 6 steps, a checkpoint every 2 steps
    and an evaluation every 3; the resume tests start from copies of its step-2 checkpoint."""
    out = tmp_path_factory.mktemp("reference")
    output = run(finetune(out, RESUME + ["--pretrained", str(data["export"]),
                                        *shard_overrides(data["retrieval_train"], data["retrieval"])], 2), seconds=900)
    return out, output


def _copy_until_step(run_dir, target, step):
    """``run_dir`` as a run that stopped after checkpoint ``step``: later checkpoints removed (their records stay in
    metrics.jsonl, as after a kill; a resume supersedes them)."""
    shutil.copytree(run_dir, target)
    for tag in (target / "checkpoints").glob("step_*"):
        if int(tag.name.split("_")[1]) > step:
            shutil.rmtree(tag)
    (target / "checkpoints" / "latest").write_text(tag_for(step))
    (target / "checkpoints" / "best.json").unlink(missing_ok=True)
    return target


def test_periodic_evaluation_keeps_the_best_checkpoint(reference):
    out, output = reference
    eval_lines = [line for line in output.splitlines() if line.startswith("eval at step ")]
    assert len(eval_lines) == 1 and eval_lines[0].startswith("eval at step 3: ") and " r_mean " in eval_lines[0]
    evals = [r for r in records(out) if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6] and all("r_mean" in r and "baseline/r_mean" in r for r in evals)
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert best["metric"] == "r_mean" and best["value"] == max(r["r_mean"] for r in evals)
    assert (out / "checkpoints" / best["tag"] / COMPLETE).exists()
    assert (out / "eval" / f"step_{6:08d}.json").exists()


def test_resume_gives_identical_losses(data, reference, tmp_path):
    """From the step-2 checkpoint, ``--resume auto`` on 2 ranks repeats steps 3–6 bit for bit (queue, teacher, data
    position and RNG restored) and the metrics hold each step once. (Kill -9 itself: tests/engine/test_zero_runs.py.)"""
    out = _copy_until_step(reference[0], tmp_path / "resumed", 2)
    args = RESUME + ["--pretrained", str(data["export"]), *shard_overrides(data["retrieval_train"], data["retrieval"])]
    run(finetune(out, args + ["--resume", "auto"], 2), seconds=900)
    resume = [r for r in records(out) if r["event"] == "resume"][-1]
    assert resume["step"] == 2
    resumed, expected = step_losses(out, after_resume=True), step_losses(reference[0])
    assert sorted(resumed) == [3, 4, 5, 6]
    assert [r["step"] for r in records(out) if r["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    for step, rec in resumed.items():
        for key in ("loss", "loss_ita", "loss_itm", "lr"):
            assert rec[key] == expected[step][key], f"step {step} {key}: {rec[key]} != {expected[step][key]}"


def test_task_only_makes_the_demo_checkpoint_then_fine_tunes_and_reports(tmp_path, demo_cache):
    """`launch/finetune.py --task grounding` with a cut-down demo: the pre-training checkpoint is made first."""
    cache, out = demo_cache, tmp_path / "run"
    demo_pretrain = "[schedule.total_steps=2, schedule.warmup_steps=1, checkpoint.every_steps=2, eval.retrieval=false]"
    output = run(finetune(out, ["--task", "grounding", f"data.cache_dir={cache}", f"task.demo_pretrain={demo_pretrain}",
                                "schedule.total_steps=2", "schedule.warmup_steps=1", "eval.max_samples=12",
                                "batch.micro_batch_per_gpu=4"], 2), seconds=900)
    (export,) = world_dir(cache).glob("pretrained-*")  # keyed by the demo pre-training's recipe
    assert (export / "model.safetensors").exists()
    assert "loaded" in output and str(export) in output  # the load report
    report = output[output.index("=== grounding evaluation ==="):]
    assert "acc (Acc@IoU≥0.5)" in report and "best trivial box" in report
    results = json.loads(next((out / "eval").glob("step_*.json")).read_text())
    assert len(results["results"]) == 12 and all(len(p["pred_box"]) == 4 for p in results["results"])
    assert_predictions_picture(output, out / "eval" / "step_00000002.png")
    assert f"plot: {out / 'curves.png'}" in output and (out / "curves.png").stat().st_size > 10_000


def test_fine_tuning_resumes_on_another_number_of_ranks(data, reference, tmp_path):
    """The 2-rank ZeRO-3 retrieval run's step-2 checkpoint, ``--resume auto`` on one rank to step 4: the universal
    conversion carries the state, the global batch is kept (accumulation 2), the steps after it are logged once."""
    out = _copy_until_step(reference[0], tmp_path / "run", 2)
    args = [a for a in RESUME if not a.startswith(("schedule.total_steps", "eval.every_steps"))] + [
        "eval.every_steps=4", "--pretrained", str(data["export"]),
        *shard_overrides(data["retrieval_train"], data["retrieval"])]
    output = run(finetune(out, args + ["schedule.total_steps=4", "--resume", "auto"], 1), seconds=900)
    resume = [r for r in records(out) if r["event"] == "resume"]
    assert len(resume) == 1 and (resume[0]["step"], resume[0]["world_size"]) == (2, 1), resume
    steps = step_losses(out, after_resume=True)
    assert sorted(steps) == [3, 4] and [steps[s]["samples"] for s in (3, 4)] == [3 * 8, 4 * 8]
    assert "=== retrieval evaluation ===" in output
