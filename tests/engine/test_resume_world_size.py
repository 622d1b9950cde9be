"""Resume on another number of ranks: 2 ranks × ZeRO-2/ZeRO-3 for K steps, then ``--resume auto`` on 1 rank to 2K
(DeepSpeed universal checkpoint), and 1 → 2 ranks. The global batch is kept (accumulation re-derived), the ZeRO stage
is kept on one rank, and weights, optimizer state, step, schedule, teacher, RNG and data position carry over."""
import json
import shutil
from functools import partial

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from mplug_ds.config import ConfigError
from mplug_ds.engine.checkpoint import TEACHER_FILE, UNIVERSAL, rank_state_file, shard_files, tag_for
from mplug_ds.engine.export import consolidate, read_teacher
from mplug_ds.engine.schedule import WarmupCosine
from mplug_ds.objectives.pretrain_config import load_train_config, validate
from mplug_ds.engine.trainer import Trainer
from mplug_ds.models.config import load_model_config
from mplug_ds.objectives.pretrain_recipe import PretrainRecipe
from mplug_ds.runtime.guards import StopRequest
from tests.engine.engine_runs import deepspeed_command, records, run, step_losses

pytestmark = pytest.mark.slow  # multi-process runs

K = 2
GLOBAL_BATCH = 8  # synthetic_tiny: 4 per rank × 2 ranks
COMMON = ["--config", "synthetic_tiny", "optim.lr=1e-3", "optim.visual_lr=1e-3", "schedule.warmup_steps=1",
          "checkpoint.every_steps=1", "checkpoint.keep_last=10", "eval.retrieval=false", "logging.progress_bar=false"]


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def two_ranks(request, tmp_path_factory):
    """K steps on 2 ranks; returns (output dir, ZeRO template)."""
    out = tmp_path_factory.mktemp(request.param)
    run(deepspeed_command(out, COMMON + [f"deepspeed.config={request.param}", f"schedule.total_steps={K}"]))
    return out, request.param


def _expected_lr(zero, total, step):
    cfg = load_train_config("synthetic_tiny", [c for c in COMMON[2:]] + [f"deepspeed.config={zero}",
                                                                        f"schedule.total_steps={total}"])
    return WarmupCosine(cfg.schedule).lr(cfg.optim.lr, step - 1)  # logged after the step that used lr(step - 1)


def test_one_rank_loads_weights_optimizer_teacher_rng_and_position_of_two(world, two_ranks, tmp_path):
    """In this process (1 rank): the universal conversion restores every part of the 2-rank checkpoint."""
    out, zero = two_ranks
    tag_dir = out / "checkpoints" / tag_for(K)
    cfg = load_train_config("synthetic_tiny", [*COMMON[2:], f"deepspeed.config={zero}", f"schedule.total_steps={2 * K}",
                                               f"run.output_dir={tmp_path}", f"run.resume={tag_dir}"])
    resolved = validate(cfg, world.world_size)
    assert cfg.batch.grad_accum_steps == 2 and cfg.batch.global_batch_size == GLOBAL_BATCH
    assert resolved.ds_config["zero_optimization"]["stage"] == int(zero[-1])  # ZeRO kept on one rank
    assert resolved.ds_config["checkpoint"]["load_universal"] is True
    trainer = Trainer(cfg, resolved, world, partial(PretrainRecipe, cfg, resolved))
    data = trainer.resume_or_start()
    saved_rank0 = torch.load(rank_state_file(tag_dir, 0), weights_only=True)
    assert torch.equal(torch.get_rng_state(), saved_rank0["rng"]["torch"])  # before anything else draws from it
    assert (trainer.state.step, trainer.state.samples_seen) == (K, K * GLOBAL_BATCH)
    assert (tag_dir / UNIVERSAL / "zero").is_dir()

    reference = consolidate(tag_dir, load_model_config(out / "model_config.yaml"))  # fp32 master weights, 2 ranks
    checked = 0
    for name, param in trainer.recipe.module.model.named_parameters():
        assert torch.equal(safe_get_full_fp32_param(param), reference[name]), name
        exp_avg, exp_avg_sq = (safe_get_full_optimizer_state(param, key) for key in ("exp_avg", "exp_avg_sq"))
        saved = torch.load(tag_dir / UNIVERSAL / "zero" / f"model.{name}" / "exp_avg.pt", weights_only=True)
        saved = saved["param"] if isinstance(saved, dict) else saved  # ZeRO-1/2 conversions wrap the tensor
        assert torch.equal(exp_avg.flatten(), saved.flatten()), name
        checked += bool(exp_avg_sq.abs().sum() > 0)  # fresh Adam state would be all zeros
    assert checked > 0.9 * len(reference)

    assert len(shard_files(tag_dir)) == 2 and not (tag_dir / TEACHER_FILE).exists()  # partitioned on 2 ranks
    teacher = read_teacher(tag_dir)
    restored = trainer.recipe.teacher.state_dict()  # replicated on one rank
    assert set(restored) == set(teacher) and all(torch.equal(restored[k], teacher[k]) for k in teacher)
    assert trainer.stream.next_index == K  # rank 0's own stream continues where it stopped

    trainer.optimizer_step(data, StopRequest())
    assert trainer.state.step == K + 1 and trainer.state.samples_seen == (K + 1) * GLOBAL_BATCH
    trainer.logger.close()


def test_two_ranks_resume_on_one_then_one_on_two(two_ranks, tmp_path):
    out, zero = two_ranks
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)
    for tag in (run_dir / "checkpoints").glob(f"step_*/{UNIVERSAL}"):  # converted by the in-process test
        shutil.rmtree(tag)
    args = COMMON + [f"deepspeed.config={zero}", "--resume", "auto"]

    run(deepspeed_command(run_dir, args + [f"schedule.total_steps={2 * K}"], num_ranks=1))
    resume = [r for r in records(run_dir) if r["event"] == "resume"][-1]
    assert (resume["step"], resume["world_size"], resume["grad_accum_steps"]) == (K, 1, 2)
    steps = step_losses(run_dir)
    assert sorted(steps) == list(range(1, 2 * K + 1))
    for step in range(K + 1, 2 * K + 1):
        assert steps[step]["samples"] == step * GLOBAL_BATCH
        assert steps[step]["lr"] == pytest.approx(_expected_lr(zero, 2 * K, step), rel=1e-9)
    marker = json.loads((run_dir / "checkpoints" / tag_for(2 * K) / "complete.json").read_text())
    assert (marker["world_size"], marker["zero_stage"], marker["global_batch"]) == (1, int(zero[-1]), GLOBAL_BATCH)
    teachers = [read_teacher(run_dir / "checkpoints" / tag_for(s)) for s in (K, 2 * K)]
    assert any(not torch.equal(teachers[0][k], teachers[1][k]) for k in teachers[0])  # the EMA went on

    if zero != "zero2":
        return  # one 1 -> 2 resume is enough
    run(deepspeed_command(run_dir, args + [f"schedule.total_steps={3 * K}"], num_ranks=2))
    resume = [r for r in records(run_dir) if r["event"] == "resume"][-1]
    assert (resume["step"], resume["world_size"], resume["grad_accum_steps"]) == (2 * K, 2, 1)
    steps = step_losses(run_dir)
    assert sorted(steps) == list(range(1, 3 * K + 1)) and steps[3 * K]["samples"] == 3 * K * GLOBAL_BATCH
    for step in range(2 * K + 1, 3 * K + 1):
        assert steps[step]["lr"] == pytest.approx(_expected_lr(zero, 3 * K, step), rel=1e-9)
        assert steps[step]["loss"] == steps[step]["loss"] and steps[step]["loss"] < 30
    # The one-rank teacher was split exactly: one step later it is its EMA with the master weights of that step.
    after = run_dir / "checkpoints" / tag_for(2 * K + 1)
    assert len(shard_files(after)) == 2
    online = consolidate(after, load_model_config(run_dir / "model_config.yaml"))
    momentum = load_train_config("synthetic_tiny", []).objective.momentum
    teacher = read_teacher(after)
    assert max((teacher[k] - v.lerp(online[k], 1 - momentum)).abs().max().item() for k, v in teachers[1].items()) < 1e-6


def test_a_global_batch_that_cannot_divide_over_the_new_ranks_fails_before_training(two_ranks, tmp_path):
    out, zero = two_ranks
    cfg = load_train_config("synthetic_tiny", [*COMMON[2:], f"deepspeed.config={zero}", "batch.micro_batch_per_gpu=3",
                                               f"run.output_dir={tmp_path}", f"run.resume={out}"])
    with pytest.raises(ConfigError, match=f"global batch of {GLOBAL_BATCH} samples.*does not divide"):
        validate(cfg, 1)


def test_a_one_rank_checkpoint_without_zero_cannot_grow_and_says_how(world, tmp_path):
    """One rank uses ZeRO stage 0 by default: its checkpoint has no partitioned optimizer files to convert."""
    overrides = [*COMMON[2:], "schedule.total_steps=1", f"run.output_dir={tmp_path}"]
    cfg = load_train_config("synthetic_tiny", overrides)
    resolved = validate(cfg, world.world_size)
    assert resolved.ds_config["zero_optimization"]["stage"] == 0
    Trainer(cfg, resolved, world, partial(PretrainRecipe, cfg, resolved)).train()
    grow = load_train_config("synthetic_tiny", overrides + ["schedule.total_steps=2", "run.resume=auto"])
    with pytest.raises(ConfigError, match="without ZeRO.*deepspeed.zero_on_one_rank=true"):
        validate(grow, 2)
    again = load_train_config("synthetic_tiny", overrides + ["schedule.total_steps=2", "run.resume=auto"])
    assert validate(again, 1).ds_config["zero_optimization"]["stage"] == 0  # same world size: resumes as before
