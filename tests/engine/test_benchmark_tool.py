"""tools/benchmark.py runs the real DeepSpeed step on CPU and reports the throughput figures."""
import json
import subprocess
import sys
from pathlib import Path

from mplug_ds.engine.flops import pretrain_flops_per_sample, vit_flops
from mplug_ds.models.config import load_model_config

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_prints_throughput_flops_and_memory_for_a_tiny_model():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "--model", "tiny", "--steps", "2",
                          "--warmup", "1", "--batch", "4", "--json"],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["samples_per_s"] > 0 and result["step_time_s"] > 0
    assert result["tflops_per_device"] > 0 and result["peak_memory_gb"] > 0
    assert result["mfu"] is None  # no known peak for a CPU


def test_flops_match_published_vit_figures_and_the_step_estimate():
    base, large = load_model_config("mplug.en.base"), load_model_config("mplug.en.large")
    assert abs(vit_flops(base) / 1e9 - 46.4) < 0.2  # ViT-B/16 @256
    assert abs(vit_flops(large) / 1e9 - 162.0) < 0.2  # ViT-L/14 @224 (open_clip profile: 162.03)
    assert 400e9 < pretrain_flops_per_sample(base) < 450e9
