"""``--report-to wandb,tensorboard`` with the real loggers: wandb offline (no network) and a TensorBoard event file
hold the step and evaluation metrics of ``metrics.jsonl`` and the run's config."""
import json
import struct
from functools import partial

import pytest

from mplug_ds.objectives.pretrain_config import load_train_config, validate
from mplug_ds.engine.trainer import Trainer
from mplug_ds.objectives.pretrain_recipe import PretrainRecipe
from tests.engine.engine_runs import step_losses

pytest.importorskip("wandb", reason="wandb is in the dev extras (pip install -e '.[dev]')")
pytest.importorskip("tensorboard", reason="tensorboard is in the dev extras (pip install -e '.[dev]')")

STEPS = 3
BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of records with 7-byte headers


def wandb_records(path):
    """Every ``Record`` (wandb's own protobuf) in an offline run's ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _item_key(item):
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_and_tensorboard_hold_the_step_and_eval_metrics_and_config(world, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written under ~
        monkeypatch.setenv(key, str(tmp_path / "wandb-home"))
    out = tmp_path / "run"
    cfg = load_train_config("synthetic_tiny", [f"run.output_dir={out}", "logging.progress_bar=false",
                                               f"schedule.total_steps={STEPS}", "eval.retrieval=true",
                                               "logging.report_to=[wandb,tensorboard]"])
    resolved = validate(cfg, world.world_size)
    Trainer(cfg, resolved, world, partial(PretrainRecipe, cfg, resolved)).train()
    logged = step_losses(out)
    assert sorted(logged) == list(range(1, STEPS + 1))

    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    board = EventAccumulator(str(events[0]), size_guidance={"scalars": 0, "tensors": 0})
    board.Reload()
    for key in ("loss", "loss_ita", "lr"):
        scalars = board.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == list(range(1, STEPS + 1))
        for s in scalars:
            assert s.value == pytest.approx(logged[s.step][key], rel=1e-6)
    evaluation = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if r["event"] == "eval"]
    assert len(evaluation) == 1 and evaluation[0]["step"] == STEPS
    eval_keys = [k for k, v in evaluation[0].items() if k not in ("step", "time") and isinstance(v, float)]
    assert "i2t_r1" in eval_keys, eval_keys
    for key in eval_keys:
        assert [(s.step, s.value) for s in board.Scalars(f"eval/{key}")] == [
            (STEPS, pytest.approx(evaluation[0][key], rel=1e-6))]
    config_text = board.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"total_steps: {STEPS}" in config_text and "report_to:" in config_text

    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    records = wandb_records(runs[0])
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {_item_key(item): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = row
    assert sorted(history) == list(range(1, STEPS + 1))
    for step, row in history.items():
        for key in ("loss", "loss_ita", "lr"):
            assert row[f"train/{key}"] == pytest.approx(logged[step][key], rel=1e-12)
    assert {k: history[STEPS][f"eval/{k}"] for k in eval_keys} == {k: evaluation[0][k] for k in eval_keys}
    config = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):  # the config given to wandb.init travels in the run record
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    assert config["schedule"]["total_steps"] == STEPS and config["logging"]["report_to"] == ["wandb", "tensorboard"]
