"""The README's main command: `deepspeed launch/pretrain.py` runs the CPU demo end to end and learns.

Shortened (fewer steps than the default demo, which README quotes from a full run): the demo data is generated on
first use, the run goes through the real launcher, and retrieval on the held-out images must be far above chance.
"""
from pathlib import Path

import pytest
from PIL import Image

from mplug_ds.data.demo_shards import world_dir
from mplug_ds.engine.checkpoint import COMPLETE
from mplug_ds.runtime.launch_env import free_port
from tests.engine.engine_runs import DEEPSPEED, PRETRAIN, records
from tests.processes import run

SHORT_STEPS = 100  # R@5 0.36 / 0.51 here (thresholds 0.25): far above chance, with margin


@pytest.mark.slow
def test_shortened_demo_generates_its_data_learns_retrieval_and_reports(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    code, output = run([DEEPSPEED, "--master_port", str(free_port()), PRETRAIN, "--output-dir", out,
                        f"data.cache_dir={cache}", f"schedule.total_steps={SHORT_STEPS}",
                        "checkpoint.every_steps=1000"], 900)
    assert code == 0, output[-8000:]
    assert (world_dir(cache) / "shards" / "train" / "manifest.json").exists()

    rows = records(out)
    steps = [r for r in rows if r["event"] == "step"]
    assert len(steps) == SHORT_STEPS
    (retrieval,) = [r for r in rows if r["event"] == "eval"]
    assert retrieval["num_images"] >= 100
    for direction in ("i2t", "t2i"):  # R@5 chance is ~0.05 on 100 images
        chance = retrieval[f"{direction}_r5_chance"]
        assert 0 < chance <= 0.06
        assert retrieval[f"{direction}_r5"] >= 5 * chance, f"{direction} R@5 not far above chance: {retrieval}"

    summary = output[output.index("=== pre-training summary ==="):]
    for name in ("total", "ita", "itm", "mlm", "prefix"):
        assert f"  {name} " in summary, summary
    assert "(chance 0.0" in summary and "samples/s" in summary
    checkpoint = Path(summary.split("checkpoint: ")[1].split()[0])
    assert checkpoint.parent == out / "checkpoints" and (checkpoint / COMPLETE).exists()
    plot = Path(summary.split("plot: ")[1].split()[0])
    assert plot == out / "curves.png" and plot.read_bytes().startswith(b"\x89PNG")
    picture = Path(summary.split("retrieval picture: ")[1].split()[0])
    assert picture == out / "eval" / f"retrieval_step_{SHORT_STEPS:08d}.png"
    with Image.open(picture) as image:  # the held-out images with their closest captions
        assert image.format == "PNG" and min(image.size) >= 300
    assert "ETA" in output
