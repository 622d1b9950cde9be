"""Config validation happens before any work starts and names the offending key."""
import json

import pytest

from mplug_ds.config import ConfigError, available_configs
from mplug_ds.objectives.cli import main
from mplug_ds.objectives.pretrain_config import load_train_config, validate
from tests.data.shard_utils import write_caption_shards, write_manifest


def test_typo_in_a_key_is_rejected_with_its_name():
    with pytest.raises(ConfigError, match=r"batch\.micro_batch_per_gpus"):
        load_train_config("synthetic_tiny", ["batch.micro_batch_per_gpus=4"])


def test_wrong_type_is_rejected_with_its_name():
    with pytest.raises(ConfigError, match=r"schedule\.total_steps"):
        load_train_config("synthetic_tiny", ["schedule.total_steps=many"])


def test_global_batch_that_does_not_divide_names_the_key():
    cfg = load_train_config("synthetic_tiny", ["batch.micro_batch_per_gpu=4", "batch.global_batch_size=20"])
    with pytest.raises(ConfigError, match=r"batch\.global_batch_size=20 .*\(4\) × 2 ranks = 8"):
        validate(cfg, world_size=2)


def test_global_batch_sets_accumulation():
    cfg = load_train_config("synthetic_tiny", ["batch.micro_batch_per_gpu=4", "batch.global_batch_size=32"])
    resolved = validate(cfg, world_size=2)
    assert cfg.batch.grad_accum_steps == 4
    assert resolved.ds_config["train_batch_size"] == 32


def test_unknown_objective_and_model_fields_are_named():
    with pytest.raises(ConfigError, match=r"objective\.mlm_prob"):
        validate(load_train_config("synthetic_tiny", ["objective.mlm_prob=0.2"]), world_size=1)
    with pytest.raises(ConfigError, match="grad_checkpoint"):
        validate(load_train_config("synthetic_tiny", ["model.overrides.grad_checkpoint=true"]), world_size=1)


def test_fp16_without_cuda_is_refused_before_start():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="fp16"):
        validate(load_train_config("synthetic_tiny", ["deepspeed.precision=fp16"]), world_size=1)


def test_unknown_report_target_is_rejected():
    with pytest.raises(ConfigError, match="report_to"):
        validate(load_train_config("synthetic_tiny", ["logging.report_to=[wandb,tensorbord]"]), world_size=1)


@pytest.mark.parametrize("name,world", [("demo", 1), ("synthetic_tiny", 2), ("base", 8), ("large", 16)])
def test_shipped_configs_validate(name, world, tmp_path):
    assert name in available_configs("pretrain")
    pattern, _ = write_caption_shards(tmp_path, "cc", n_shards=world * 4, per_shard=2)
    manifest = write_manifest(tmp_path, {f"cc-{i:06d}.tar": 2 for i in range(world * 4)})
    shards = [] if name in ("demo", "synthetic_tiny") else [
        f"data.pipeline.sources=[{{name: cc, shards: '{pattern}', manifest: {manifest}}}]"]
    resolved = validate(load_train_config(name, shards), world_size=world)
    assert resolved.ds_config["train_batch_size"] % world == 0


def test_cli_reports_the_bad_key_and_exits_nonzero(capsys, tmp_path):
    code = main(["--config", "synthetic_tiny", f"run.output_dir={tmp_path}", "optim.learning_rate=1e-4"])
    assert code == 2
    assert "optim.learning_rate" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_missing_optional_sink_is_a_clear_config_error():
    import importlib.util

    from mplug_ds.engine.logging import check_report_to

    assert check_report_to(["none"]) == []
    for target, package in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if importlib.util.find_spec(package) is None:
            with pytest.raises(ConfigError, match=f"pip install {package}"):
                check_report_to([target])
        else:
            assert check_report_to([target, "none"]) == [target]


def _bad_inputs(tmp_path):
    """(overrides, what the message must name) for each input that used to pass validation and fail later."""
    pattern, _ = write_caption_shards(tmp_path / "shards", "cc", n_shards=2, per_shard=2)
    shards = "data.source=shards"
    stage4, misspelt = tmp_path / "stage4.json", tmp_path / "misspelt.json"
    stage4.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    misspelt.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimiser": {"device": "cpu"}}}))
    (tmp_path / "a_file").write_text("")
    return {
        "missing manifest": ([shards, f"data.pipeline.sources=[{{name: cc, shards: '{pattern}', "
                                      f"manifest: {tmp_path}/none/manifest.json}}]"],
                             [f"{tmp_path}/none/manifest.json", "data.pipeline.sources[0].manifest"]),
        "missing shard files": ([shards, f"data.pipeline.sources=[{{name: cc, shards: '{tmp_path}/x-{{0..3}}.tar'}}]"],
                                [f"{tmp_path}/x-0.tar", "data.pipeline.sources[0].shards"]),
        "zero stage 4": ([f"deepspeed.config={stage4}"], [str(stage4), "zero_optimization.stage"]),
        "misspelt nested key": ([f"deepspeed.config={misspelt}"],
                                [str(misspelt), "zero_optimization.offload_optimiser", "spelling"]),
        "lr nan": (["optim.lr=.nan"], ["optim.lr", "finite"]),
        "lr inf": (["optim.lr=.inf"], ["optim.lr", "finite"]),
        "negative weight decay": (["optim.weight_decay=-0.1"], ["optim.weight_decay", ">= 0"]),
        "negative workers": (["data.pipeline.num_workers=-1"], ["data.pipeline.num_workers", ">= 0"]),
        "eval batch 0": (["eval.batch_size=0"], ["eval.batch_size", ">= 1"]),
        "log every 0": (["logging.every_steps=0"], ["logging.every_steps", ">= 1"]),
        "output dir under a file": ([f"run.output_dir={tmp_path}/a_file/run"],
                                    ["run.output_dir", f"{tmp_path}/a_file", "--output-dir"]),
        "resume typo": (["--resume", "autoo"], ["run.resume", "autoo", "--resume auto"]),
        "hang timeout above the backend's": (["run.hang_timeout_s=600"],
                                             ["run.hang_timeout_s=600", "below run.collective_timeout_s=600"]),
        "short last batches": (["data.pipeline.drop_last=false"], ["data.pipeline.drop_last must be true"]),
    }


@pytest.mark.parametrize("case", ["missing manifest", "missing shard files", "zero stage 4", "misspelt nested key",
                                  "lr nan", "lr inf", "negative weight decay", "negative workers", "eval batch 0",
                                  "log every 0", "output dir under a file", "resume typo",
                                  "hang timeout above the backend's", "short last batches"])
def test_bad_input_fails_before_work_naming_the_key_or_file(case, tmp_path, capsys):
    overrides, named = _bad_inputs(tmp_path)[case]
    out = tmp_path / "run"
    code = main(["--config", "synthetic_tiny", f"run.output_dir={out}", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    for text in named:
        assert text in err, f"{text!r} not in: {err}"
    assert not out.exists()
