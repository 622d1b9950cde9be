"""The README's main command: `deepspeed launch/pretrain.py` with no configuration runs the CPU demo end to end."""
from pathlib import Path

import pytest

from mplug_ds.engine.checkpoint import COMPLETE
from tests.engine.engine_runs import DEEPSPEED, PRETRAIN, records
from tests.processes import run


@pytest.mark.slow
def test_demo_generates_its_data_trains_and_reports(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    code, output = run([DEEPSPEED, PRETRAIN, "--output-dir", out, f"data.cache_dir={cache}"], 900)
    assert code == 0, output[-8000:]
    assert (cache / "shards" / "train" / "manifest.json").exists()
    steps = [r for r in records(out) if r["event"] == "step"]
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-5:]) / 5
    assert last < 0.8 * first, f"demo loss did not fall: {first:.3f} -> {last:.3f}"
    summary = output[output.index("=== pre-training summary ==="):]
    assert "zero-shot retrieval" in summary and "R@1" in summary
    checkpoint = Path(summary.split("checkpoint: ")[1].split()[0])
    assert checkpoint.parent == out / "checkpoints" and (checkpoint / COMPLETE).exists()
