"""Tensors a checkpoint never trained (a converted VQA release has no ITM/contrastive heads, temperature or MLM
head): recorded by the converter, an error for evaluating a task that uses them (before any rank starts), one
warning naming them for fine-tuning it, a warning on ``mplug_ds.load`` and a refusal of that task's predictions."""
import contextlib
import io
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

import mplug_ds
from mplug_ds.models.config import load_model_config
from mplug_ds.runtime.launch_env import WorldInfo
from mplug_ds.tasks import build_task
from mplug_ds.tasks.cli import EXIT_CONFIG_ERROR, build_parser, config_from_args, main, validate_task
from mplug_ds.tasks.pretrained import check_trained, random_init_keys
from mplug_ds.tasks.recipe import TaskRecipe
from tests.models.official_layout import official_checkpoint
from tests.tasks.task_data import shard_overrides, write_retrieval_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import convert_checkpoint  # noqa: E402

VQA_RELEASE_LACKS = {"itm_head", "temp", "vision_proj", "text_proj", "mlm_head"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A fine-tuned VQA release in the official layout (tiny), converted; its conversion report; caption shards."""
    root = tmp_path_factory.mktemp("random_init")
    torch.save(official_checkpoint(load_model_config("tiny"), pretrained=False, queues=False), root / "vqa.pth")
    with contextlib.redirect_stdout(io.StringIO()) as out:  # the report: the JSON on stdout
        code = convert_checkpoint.main([str(root / "vqa.pth"), str(root / "converted"), "--model", "tiny", "--json"])
    assert code == 0
    return root / "converted", json.loads(out.getvalue()), write_retrieval_shards(root / "shards", "r", [4])


def test_the_conversion_records_the_keys_it_left_at_random_init(converted):
    path, report, _ = converted
    assert random_init_keys(path) == sorted(report["missing"])
    assert {k.split(".")[0] for k in report["missing"]} == VQA_RELEASE_LACKS
    check_trained(path, "vqa", build_task("vqa").uses)  # VQA uses none of them


def test_evaluating_a_task_that_uses_them_fails_before_start_naming_them(converted, single_process_env, capsys):
    path, _, shards = converted
    code = main(["--task", "retrieval", "--evaluate", "--pretrained", str(path), *shard_overrides(shards, shards)])
    assert code == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert f"{path} left at random initialisation what task 'retrieval' uses: itm_head (2 tensors), temp (1 tensor), " \
           "text_proj (2 tensors), vision_proj (2 tensors)" in err
    assert "meaningless" in err and "mlm_head" not in err


def test_fine_tuning_from_it_warns_once_naming_them_and_records_what_stays_untrained(converted, caplog):
    path, report, shards = converted
    args = build_parser().parse_intermixed_args(["--task", "retrieval", "--pretrained", str(path),
                                                 *shard_overrides(shards, shards), "task.options.queue_size=48"])
    cfg = config_from_args(args)
    with caplog.at_level(logging.INFO, logger="mplug_ds.train"):
        recipe = TaskRecipe(cfg, validate_task(cfg, 1), WorldInfo(rank=0, local_rank=0, world_size=1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "itm_head (2 tensors)" in warnings[0] and "vision_proj" in warnings[0]
    saved = recipe.saved_configs()["random_init.yaml"]  # an export of this run records what it never trains
    assert saved["keys"] == sorted(k for k in report["missing"] if k.startswith("mlm_head."))


def test_load_warns_and_refuses_the_tasks_that_use_them(converted):
    path, _, _ = converted
    with pytest.warns(UserWarning, match=r"never trained .*itm_head \(2 tensors\).*mlm_head"):
        predictor = mplug_ds.load(path)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="left at random initialisation what task 'retrieval' uses: itm_head"):
        predictor.rank([image], ["a black square"])
    assert isinstance(predictor.answer([image], ["what colour is it?"])[0], str)  # VQA has what it needs
