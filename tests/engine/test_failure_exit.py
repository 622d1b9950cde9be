"""Every failure ends every rank with a non-zero exit within seconds (2 ranks under the real deepspeed launcher).

Each test runs ``launch/pretrain.py`` over real WebDataset shards with a DataLoader worker per rank (the workers
block SIGTERM, which used to keep a failed rank alive forever) and asserts that the whole process group is gone
within 60 s of the first traceback. Disk-full and transform failures are injected by tests/engine/faults.
"""
import os
import re
import signal

import pytest

from mplug_ds.engine.checkpoint import latest_complete, tag_for
from tests.data.shard_utils import write_caption_shards, write_manifest
from tests.engine.engine_runs import deepspeed_command as _command
from tests.engine.engine_runs import records, run_until_all_exit, step_losses

LIMIT = 60.0


def deepspeed_command(out, args):
    return _command(out, args, launcher="deepspeed")  # the launcher's part in ending a job is under test


def shard_args(tmp_path, n_shards=4, per_shard=16):
    pattern, _ = write_caption_shards(tmp_path / "shards", "cap", n_shards, per_shard)
    manifest = write_manifest(tmp_path / "shards", {f"cap-{i:06d}.tar": per_shard for i in range(n_shards)})
    return ["--config", "synthetic_tiny", "data.source=shards", "data.pipeline.num_workers=1",
            f"data.pipeline.sources=[{{name: cap, shards: '{pattern}', manifest: {manifest}}}]",
            "schedule.total_steps=1000", "checkpoint.every_steps=1000", "eval.retrieval=false",
            "logging.progress_bar=false"]


@pytest.mark.slow
def test_disk_full_while_checkpointing_ends_every_rank(tmp_path):
    command = deepspeed_command(tmp_path / "run", shard_args(tmp_path) + ["checkpoint.every_steps=2"])
    ended = run_until_all_exit(command, LIMIT, mark="Traceback", fault="enospc:0")
    assert ended.code != 0
    assert "No space left on device" in ended.output
    assert "rank 0: failed (OSError" in ended.output
    report = (tmp_path / "run" / "hang" / "report.txt").read_text()  # the peer saw a lost rank; the report says why
    assert "What happened: rank 0 failed (checkpoint at step 2): OSError: [Errno 28] No space left on device" in report


@pytest.mark.slow
def test_transform_error_in_a_loader_worker_ends_every_rank(tmp_path):
    ended = run_until_all_exit(deepspeed_command(tmp_path / "run", shard_args(tmp_path)), LIMIT, mark="Traceback",
                               fault="transform:1:10")
    assert ended.code != 0
    assert "injected transform failure" in ended.output and "rank 1: failed" in ended.output
    report = (tmp_path / "run" / "hang" / "report.txt").read_text()
    assert re.search(r"What happened: rank 1 failed \(step \d+, micro_batch 1/1, samples_seen \d+\): "
                     r"RuntimeError: Caught RuntimeError in DataLoader worker process 0\. … "
                     r"RuntimeError: injected transform failure at image 10", report), report


@pytest.mark.slow
def test_missing_shard_files_end_every_rank_before_work(tmp_path):
    args = shard_args(tmp_path)
    args[4] = f"data.pipeline.sources=[{{name: cap, shards: '{tmp_path}/gone-{{000000..000003}}.tar'}}]"
    ended = run_until_all_exit(deepspeed_command(tmp_path / "run", args), LIMIT)
    assert ended.code != 0
    assert f"{tmp_path}/gone-000000.tar" in ended.output and "data.pipeline.sources[0].shards" in ended.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_sigterm_to_the_launcher_alone_stops_every_rank_with_a_checkpoint(tmp_path):
    """A scheduler or Ctrl-C often signals only the ``deepspeed`` process, which forwards nothing on one node."""
    out = tmp_path / "run"
    command = deepspeed_command(out, shard_args(tmp_path) + ["logging.every_steps=1"])
    ended = run_until_all_exit(command, LIMIT, mark="step 2/1000",
                               on_mark=lambda proc: os.kill(proc.pid, signal.SIGTERM))
    assert ended.output.count("exits successfully") == 2, ended.output[-4000:]  # deepspeed's per-node launcher
    last_step = max(step_losses(out))
    assert latest_complete(out / "checkpoints") == out / "checkpoints" / tag_for(last_step)
    summary = [r for r in records(out) if r["event"] == "summary"][-1]
    assert summary["stopped_by_signal"] is True and summary["steps"] == last_step
    assert "launcher" in ended.output and "resume with --resume auto" in ended.output
