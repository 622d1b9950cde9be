"""tools/timix_viz.py and tools/benchmark.py --timix, run as a user runs them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from mplug_ds.config import to_dict
from mplug_ds.models.config import load_model_config
from mplug_ds.models.mplug import build_model
from tests.processes import child_env, timeout

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import timix_viz  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _export(out: Path, overrides: list[str]) -> Path:
    """An export directory (model.safetensors + model_config.yaml) of a freshly built model."""
    cfg = load_model_config("tiny", overrides)
    out.mkdir(parents=True)
    save_file({k: v.contiguous().clone() for k, v in build_model(cfg).state_dict().items()},
              str(out / "model.safetensors"))
    (out / "model_config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return out


@pytest.mark.slow
def test_timix_viz_writes_a_png_grid_and_refuses_a_model_without_predictor(tmp_path, demo_cache, capsys):
    torch.manual_seed(0)
    export = _export(tmp_path / "timix", ["patch_predictor_layer=1"])
    png = tmp_path / "grid.png"
    args = ["--demo-cache", str(demo_cache), "--images", "3", "--side", "2", "--out", str(png)]
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "timix_viz.py"), str(export), *args],
                          capture_output=True, text=True, timeout=timeout(300))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(png)
    width, height = Image.open(png).size
    assert width > 1000 and height > 600  # 3 rows × 5 panels
    plain = _export(tmp_path / "plain", [])
    assert timix_viz.main([str(plain), *args]) == 1
    assert "no patch predictor" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_timix_reports_both_steps_and_their_ratio():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "--model", "tiny", "--steps", "2",
                          "--warmup", "1", "--batch", "8", "--timix", "--json"],
                         check=True, capture_output=True, text=True, timeout=timeout(600),
                         env=child_env()).stdout.strip().splitlines()  # not this process's rendezvous variables
    results = [json.loads(line) for line in out if line.startswith('{"model"')]
    (ratio_line,) = [line for line in out if line.startswith("TiMix vs plain")]
    timix, plain = results
    assert timix["timix"] and not plain["timix"] and timix["step_time_s"] > 0 and plain["step_time_s"] > 0
    ratio = timix["step_time_s"] / plain["step_time_s"]
    assert ratio_line.startswith("TiMix vs plain (tiny, same run): ") and f"{ratio:.2f}x step time" in ratio_line
