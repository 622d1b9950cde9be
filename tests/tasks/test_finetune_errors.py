"""launch/finetune.py refuses bad input before any training starts, naming the thing and the fix."""
import pytest

from mplug_ds.tasks import TASKS
from mplug_ds.tasks.cli import EXIT_CONFIG_ERROR, main
from tests.data.shard_utils import write_caption_shards, write_manifest
from tests.tasks.task_data import shard_overrides, write_export, write_grounding_shards

pytestmark = pytest.mark.usefixtures("single_process_env")


def _fails(capsys, *argv):
    assert main(list(argv)) == EXIT_CONFIG_ERROR
    return capsys.readouterr().err


def test_wrong_task_name(capsys, tmp_path):
    err = _fails(capsys, "--task", "grouding", "--output-dir", str(tmp_path))
    assert "unknown task 'grouding'" in err and ", ".join(sorted(TASKS)) in err


def test_missing_and_incompatible_pretrained(capsys, tmp_path):
    train = write_grounding_shards(tmp_path / "train", "g", [4], ["train"])
    data = shard_overrides(train, train)
    err = _fails(capsys, "--task", "grounding", "--pretrained", str(tmp_path / "missing"), *data)
    assert f"--pretrained {tmp_path / 'missing'}: no such file" in err
    err = _fails(capsys, "--task", "grounding", "--pretrained", str(tmp_path), *data)
    assert "not an export directory" in err and "tools/export_checkpoint.py" in err
    export = write_export(tmp_path / "export", overrides=("embed_dim=48",))
    err = _fails(capsys, "--task", "grounding", "--pretrained", str(export), *data)
    assert "'text_proj.bias' has shape [48] but model 'tiny' expects [32]" in err and "set model.name" in err


def test_shards_without_the_task_fields(capsys, tmp_path):
    pattern, _ = write_caption_shards(tmp_path / "captions", "cap", 1, 3)
    write_manifest(tmp_path / "captions", {"cap-000000.tar": 3})
    export = write_export(tmp_path / "export")
    err = _fails(capsys, "--task", "grounding", "--pretrained", str(export), *shard_overrides(pattern, pattern))
    assert "data.pipeline.sources[0].shards: sample 'cap_000_000'" in err and "has no boxes" in err
    assert "--format refcoco" in err
    err = _fails(capsys, "--task", "retrieval", "--pretrained", str(export), *shard_overrides(pattern, pattern),
                 "task.options.queue_size=10", "batch.micro_batch_per_gpu=4")
    assert "task.options.queue_size=10 must be a multiple of the global batch 4" in err


def test_config_of_another_task(capsys, tmp_path):
    err = _fails(capsys, "--task", "grounding", "--config", "retrieval_demo", "--output-dir", str(tmp_path))
    assert "config 'retrieval_demo' is for task 'retrieval'" in err
