"""No checkpoint file runs code when loaded: --resume and the export tool refuse a planted pickle, naming the file."""
import os
import shutil
from functools import partial

import numpy as np
import pytest
import torch

from mplug_ds.engine.checkpoint import rank_state_file, tag_for
from mplug_ds.objectives.pretrain_config import load_train_config, validate
from mplug_ds.engine.trainer import Trainer
from mplug_ds.objectives.pretrain_recipe import PretrainRecipe
from mplug_ds.runtime import safe_load
from mplug_ds.runtime.safe_load import UntrustedCheckpointError
from tools.export_checkpoint import main as export_main


class Payload:
    """Unpickling this runs a shell command (what a planted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _trainer(world, out, *overrides):
    cfg = load_train_config("synthetic_tiny", [f"run.output_dir={out}", "logging.progress_bar=false",
                                               "schedule.total_steps=1", "schedule.warmup_steps=0",
                                               "checkpoint.every_steps=1", "eval.retrieval=false",
                                               "deepspeed.zero_on_one_rank=true",  # ZeRO's optimizer file, as on N ranks
                                               *overrides])
    resolved = validate(cfg, world.world_size)
    return Trainer(cfg, resolved, world, partial(PretrainRecipe, cfg, resolved))


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    _trainer(world, out).train()
    (out / "checkpoints" / "latest").unlink()
    return out / "checkpoints" / tag_for(1)


def _planted(checkpoint, tmp_path, name, content):
    """A copy of the run with ``name`` in its checkpoint replaced by ``content``."""
    run = tmp_path / "run"
    shutil.copytree(checkpoint.parent.parent, run)
    target = run / "checkpoints" / tag_for(1) / name
    torch.save(content, target)
    return run, target


def test_every_file_of_a_checkpoint_is_checked(checkpoint):
    names = sorted(p.name for p in checkpoint.glob("*.pt"))
    assert names == ["momentum_teacher.pt", "mp_rank_00_model_states.pt", "rank_00000_state.pt",
                     "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


@pytest.mark.parametrize("name", ["momentum_teacher.pt", "mp_rank_00_model_states.pt", "rank_00000_state.pt",
                                  "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_resume_and_export_refuse_a_planted_pickle_naming_the_file(world, checkpoint, tmp_path, name, capsys):
    marker = tmp_path / "code_ran"
    original = safe_load.load(checkpoint / name)  # the real content, with the payload planted beside it
    run, target = _planted(checkpoint, tmp_path, name, {**original, "extra": Payload(marker)})
    trainer = _trainer(world, tmp_path / "resumed", f"run.resume={run}")
    with pytest.raises(UntrustedCheckpointError, match=str(target)) as refused:
        trainer.resume_or_start()
    assert "posix.system" in str(refused.value) and "--trust-checkpoint" in str(refused.value)
    trainer.logger.close()

    assert export_main([str(run), "--out", str(tmp_path / "export")]) == 1
    assert str(target) in capsys.readouterr().err
    assert not (tmp_path / "export" / "model.safetensors").exists()
    assert not marker.exists()


def test_rank_state_of_an_older_release_loads_only_with_the_trust_flag(world, checkpoint, tmp_path):
    """Releases before this one stored the NumPy RNG state as an array (a pickled NumPy object)."""
    saved = safe_load.load(rank_state_file(checkpoint, 0))
    name, keys, pos, has_gauss, gauss = saved["rng"]["numpy"]
    old = {**saved, "rng": {**saved["rng"], "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)}}
    run, target = _planted(checkpoint, tmp_path, rank_state_file(checkpoint, 0).name, old)
    refused = _trainer(world, tmp_path / "a", f"run.resume={run}")
    with pytest.raises(UntrustedCheckpointError, match=str(target)):
        refused.resume_or_start()
    refused.logger.close()
    trusted = _trainer(world, tmp_path / "b", f"run.resume={run}", "checkpoint.trust_pickles=true")
    trusted.resume_or_start()
    assert trusted.state.step == 1
    trusted.logger.close()
