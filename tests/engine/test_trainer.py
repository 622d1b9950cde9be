"""The training loop in this process (one rank, real DeepSpeed engine): non-finite guard, checkpoints, SIGTERM."""
import json
import os
import shutil
import signal
import sys
from functools import partial

import pytest
import torch

from mplug_ds.config import to_dict
from mplug_ds.engine.checkpoint import (
    COMPLETE,
    LATEST,
    TEACHER_FILE,
    complete_checkpoints,
    latest_complete,
    resolve_resume,
    tag_for,
)
from mplug_ds.objectives.pretrain_config import load_train_config, validate
from mplug_ds.engine.trainer import Trainer
from mplug_ds.objectives.pretrain_recipe import PretrainRecipe
from mplug_ds.runtime.atomic import atomic_torch_save, atomic_write_text
from mplug_ds.runtime.guards import NonFiniteLossError, StopRequest
from tests.engine.engine_runs import PRETRAIN, records, step_losses
from tests.processes import started, timeout, wait_for


def _trainer(world, out, *overrides):
    cfg = load_train_config("synthetic_tiny", [f"run.output_dir={out}", "logging.progress_bar=false", *overrides])
    resolved = validate(cfg, world.world_size)
    return Trainer(cfg, resolved, world, partial(PretrainRecipe, cfg, resolved))


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_nonfinite_batch_is_skipped_and_repeated_ones_abort(world, tmp_path, zero):
    trainer = _trainer(world, tmp_path, "run.max_nonfinite_steps=3", f"deepspeed.config={zero}")
    head = trainer.recipe.module.model.itm_head.weight
    head = getattr(head, "ds_tensor", head)  # ZeRO-3 gathers the module weight from this (one rank: all of it)
    healthy = head.detach().clone()

    def batches(n_bad):
        """``n_bad`` batches whose ITM loss is NaN (a transiently non-finite head), then healthy ones."""
        with torch.no_grad():
            head.fill_(float("nan"))
        for index in range(n_bad):
            yield trainer.stream.batch(index)
        with torch.no_grad():
            head.copy_(healthy)
        while True:
            yield trainer.stream.batch(n_bad)

    before = {n: p.detach().clone() for n, p in trainer.recipe.module.model.named_parameters()}
    trainer.optimizer_step(batches(1), StopRequest())
    assert trainer.state.step == 1 and trainer.state.skipped_batches == 1
    rows = records(tmp_path)
    assert [r["event"] for r in rows] == ["skipped_batch", "step"]
    assert rows[0]["loss_itm"] != rows[0]["loss_itm"]  # NaN was reported
    assert all(map(lambda v: v == v, [rows[1]["loss"], rows[1]["loss_itm"]]))
    after = dict(trainer.recipe.module.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)

    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        trainer.optimizer_step(batches(3), StopRequest())
    trainer.logger.close()


def test_checkpoints_keep_last_n_and_resume_restores_state_bit_for_bit(world, tmp_path):
    first = _trainer(world, tmp_path, "schedule.total_steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=2")
    summary = first.train()
    # Everything resolved is saved beside the run and reproduces it: config (objective included), model, DeepSpeed.
    rerun = load_train_config(tmp_path / "config.yaml", [f"model.name={tmp_path / 'model_config.yaml'}",
                                                          f"deepspeed.config={tmp_path / 'ds_config.json'}"])
    again = validate(rerun, world.world_size)
    assert to_dict(again.model) == to_dict(first.recipe.resolved.model)
    assert again.ds_config == first.resolved.ds_config and again.objective == first.cfg.objective
    assert to_dict(rerun)["schedule"] == to_dict(first.cfg)["schedule"]
    ckpts = tmp_path / "checkpoints"
    assert [s for s, _ in complete_checkpoints(ckpts)] == [2, 3]
    assert (ckpts / LATEST).read_text() == tag_for(3) and summary.checkpoint == str(ckpts / tag_for(3))
    # A save that died half-way (no completion marker) is never picked.
    shutil.copytree(ckpts / tag_for(3), ckpts / tag_for(4))
    (ckpts / tag_for(4) / COMPLETE).unlink()
    assert latest_complete(ckpts) == ckpts / tag_for(3) == resolve_resume("auto", ckpts)
    with pytest.raises(FileNotFoundError, match="complete.json"):
        resolve_resume(str(ckpts / tag_for(4)), ckpts)

    second = _trainer(world, tmp_path, "schedule.total_steps=4", "run.resume=auto")
    data = second.resume_or_start()
    saved_teacher = torch.load(ckpts / tag_for(3) / TEACHER_FILE, weights_only=True)
    restored = second.recipe.teacher.state_dict()
    assert all(torch.equal(restored[k], saved_teacher[k]) for k in saved_teacher)
    assert (second.state.step, second.state.samples_seen) == (3, 3 * 4)
    assert second.stream.next_index == 3
    online_first = dict(first.recipe.module.model.named_parameters())
    assert all(torch.equal(p, online_first[n]) for n, p in second.recipe.module.model.named_parameters())
    second.optimizer_step(data, StopRequest())
    assert second.state.step == 4
    second.logger.close()


def test_metrics_after_a_resume_hold_one_history(world, tmp_path):
    """Steps logged after the last checkpoint by a run that then died are replaced by the resumed run's."""
    killed = _trainer(world, tmp_path, "schedule.total_steps=3", "checkpoint.every_steps=2",
                      "checkpoint.save_final=false", "eval.retrieval=false")
    killed.train()  # stands in for a run killed after step 3: its checkpoint is at step 2
    with open(tmp_path / "metrics.jsonl", "a") as metrics:
        metrics.write('{"event": "step", "step": 4, "lo')  # the line the kill cut short
    resumed = _trainer(world, tmp_path, "schedule.total_steps=4", "run.resume=auto", "eval.retrieval=false")
    resumed.train()
    rows = records(tmp_path)
    assert [r["step"] for r in rows if r["event"] == "step"] == [1, 2, 3, 4]
    resume = [r for r in rows if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 2 and resume[0]["superseded_records"] == 2
    assert [r["step"] for r in rows if r["event"] == "checkpoint"] == [2, 4]


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    with pytest.raises(Exception):
        atomic_torch_save({"not picklable": lambda: None}, tmp_path / "state.pt")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(tmp_path / "note.txt", "\udc80")  # a lone surrogate cannot be written
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_a_checkpoint_and_exits_zero(tmp_path, demo_cache):
    """Plain ``python launch/pretrain.py`` on demo shards with a DataLoader worker; SIGTERM to the whole process
    group (as Slurm and the deepspeed launcher send it, killing the worker too) → checkpoint, exit status 0."""
    out = tmp_path / "run"
    command = [sys.executable, str(PRETRAIN), f"run.output_dir={out}", f"data.cache_dir={demo_cache}",
               "batch.micro_batch_per_gpu=4", "schedule.total_steps=100000", "checkpoint.every_steps=100000",
               "logging.progress_bar=false"]
    metrics = out / "metrics.jsonl"
    with started(command) as proc:
        wait_for(lambda: metrics.exists() and '"event": "step"' in metrics.read_text(), 120, proc, "a first step")
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=timeout(120))
    assert proc.returncode == 0, output[-4000:]
    last_step = max(step_losses(out))
    assert latest_complete(out / "checkpoints") == out / "checkpoints" / tag_for(last_step)
    summary = [r for r in records(out) if r["event"] == "summary"][-1]
    assert summary["stopped_by_signal"] is True
    assert "received SIGTERM" in output
    assert json.loads((out / "checkpoints" / tag_for(last_step) / COMPLETE).read_text())["step"] == last_step


@pytest.mark.parametrize("zero_on_one_rank", [False, True])
def test_one_rank_checkpoint_exports_the_trained_weights(world, tmp_path, zero_on_one_rank):
    """A 1-rank run (ZeRO stage 0 by default, ZeRO-2 when kept) exports exactly the weights it trained."""
    from safetensors.torch import load_file

    from mplug_ds.engine.export import export_checkpoint

    trainer = _trainer(world, tmp_path / "run", "schedule.total_steps=1", "schedule.warmup_steps=0",
                       "checkpoint.every_steps=1", "eval.retrieval=false",
                       f"deepspeed.zero_on_one_rank={str(zero_on_one_rank).lower()}")
    assert trainer.engine.zero_optimization_stage() == (2 if zero_on_one_rank else 0)
    trainer.train()
    trained = {k: v.detach().clone() for k, v in trainer.recipe.module.model.state_dict().items()}
    exported = load_file(export_checkpoint(tmp_path / "run", tmp_path / "export") / "model.safetensors")
    assert set(exported) == set(trained)
    assert all(torch.equal(exported[k], trained[k].float()) for k in trained)
