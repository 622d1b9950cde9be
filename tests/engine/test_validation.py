"""Config validation happens before any work starts and names the offending key."""
import pytest

from mplug_ds.config import ConfigError, available_configs
from mplug_ds.engine.cli import main
from mplug_ds.engine.train_config import load_train_config
from mplug_ds.engine.validate import validate


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
def test_shipped_configs_validate(name, world):
    assert name in available_configs("pretrain")
    shards = [] if name in ("demo", "synthetic_tiny") else [
        "data.pipeline.sources=[{name: cc, shards: '/data/cc/{000000..000009}.tar', manifest: /data/cc/m.json}]"]
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
