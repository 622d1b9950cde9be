"""TiMix through the real engine: optimizer steps per batch (in this process, one rank) and the demo_timix config
on 2 CPU ranks with ZeRO-3 (ZeRO-1: tests/engine/test_zero_runs.py)."""
import pytest
import torch

from mplug_ds.objectives.pretrain_config import load_train_config, validate
from mplug_ds.engine.trainer import Trainer
from mplug_ds.objectives.timix_recipe import TimixRecipe, pretrain_recipe
from tests.engine.engine_runs import assert_timix_trained, deepspeed_command, run, step_losses



def _adam_steps(trainer):
    adam = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # the torch AdamW inside the ZeRO wrapper
    return {int(state["step"]) for state in adam.state.values() if "step" in state}


@pytest.mark.parametrize("order, per_batch", [("fused", 1), pytest.param("reference_three_steps", 3,
                                                                         marks=pytest.mark.slow)])
def test_optimizer_steps_per_batch(world, tmp_path, order, per_batch):
    steps = 3
    cfg = load_train_config("synthetic_tiny", [
        f"run.output_dir={tmp_path}", "logging.progress_bar=false", "eval.retrieval=false",
        "checkpoint.save_final=false", f"schedule.total_steps={steps}", "timix.enabled=true",
        "timix.gamma_ramp_steps=1", "timix.region_images_per_gpu=2", f"timix.step_order={order}"])
    resolved = validate(cfg, world.world_size)
    trainer = Trainer(cfg, resolved, world, pretrain_recipe(cfg, resolved))
    assert isinstance(trainer.recipe, TimixRecipe)
    predictor = trainer.recipe.module.model.patch_predictor.classifier[-1].bias
    before = predictor.detach().clone()
    trainer.train()
    # γ is 0 at step 0, so the reference order's first batch has no mixed step: 2 + 3 + 3.
    expected = steps if per_batch == 1 else 2 + 3 * (steps - 1)
    assert trainer.engine.global_steps == expected
    # AdamW steps a parameter only when it has a gradient: fused, every parameter gets exactly one update per batch;
    # in the reference order the ViT's first blocks and the text encoder (in all three phases) get all of them.
    counts = _adam_steps(trainer)
    assert counts == {expected} if per_batch == 1 else max(counts) == expected
    assert not torch.equal(predictor.detach(), before)
    rows = step_losses(tmp_path)
    assert sorted(rows) == [1, 2, 3] and rows[1]["gamma"] == 0 and rows[2]["gamma"] == 1
    assert rows[1]["loss_mix"] == 0 and rows[2]["loss_mix"] > 0 and rows[3]["loss_pta"] > 0


@pytest.mark.slow
def test_demo_timix_runs_on_two_ranks_with_zero3(tmp_path, demo_cache):
    """bf16 + ZeRO-3 without TiMix: test_zero_runs; TiMix on ZeRO-1: test_zero_runs' demo-shard run."""
    steps = 3
    out = tmp_path / "run"
    run(deepspeed_command(out, ["--config", "demo_timix", "deepspeed.config=zero3", f"schedule.total_steps={steps}",
                                "schedule.warmup_steps=1", "schedule.alpha_warmup_steps=2",
                                "timix.gamma_ramp_steps=2", f"data.cache_dir={demo_cache}",
                                "eval.retrieval=false", "logging.progress_bar=false",
                                "model.overrides.grad_checkpointing=true"]), seconds=900)
    rows = step_losses(out)
    assert sorted(rows) == list(range(1, steps + 1))
    assert_timix_trained(rows, out)
