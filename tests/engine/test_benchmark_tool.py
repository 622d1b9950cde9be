"""tools/benchmark.py runs the real DeepSpeed step on CPU and reports the throughput figures."""
import json
import sys

import pytest

from mplug_ds.engine.flops import device_peak_tflops, pretrain_flops_per_sample, vit_flops
from mplug_ds.models.config import load_model_config
from tests.processes import REPO as ROOT
from tests.processes import run_checked


@pytest.mark.slow
def test_benchmark_runs_the_training_step_on_30_token_captions_and_reports_throughput():
    out = run_checked([sys.executable, ROOT / "tools" / "benchmark.py", "--model", "tiny", "--steps", "2",
                       "--warmup", "1", "--batch", "4", "--text-len", "30", "--json", "--watchdog", "--repeats", "1"],
                      300)
    result = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert result["watchdog_on_step_time_s"] > 0 and result["watchdog_off_step_time_s"] > 0
    assert "hang watchdog on vs off (1 interleaved pairs of 2 steps, same engine): " in out
    assert result["text_len"] == 30  # every caption reaches the model padded to --text-len, as in training
    assert result["skipped_batches"] == 0  # the trainer's step (with its non-finite guard) was timed
    assert result["samples_per_s"] > 0 and result["step_time_s"] > 0
    assert result["tflops_per_device"] > 0 and result["peak_memory_gb"] > 0
    peak = device_peak_tflops(result["device"])  # None on a CPU or an unknown GPU
    assert (result["mfu"] is None) == (peak is None)
    assert result["mfu"] is None or 0 < result["mfu"] < 1


def test_flops_match_published_vit_figures_and_the_step_estimate():
    base, large = load_model_config("mplug.en.base"), load_model_config("mplug.en.large")
    assert abs(vit_flops(base) / 1e9 - 46.4) < 0.2  # ViT-B/16 @256
    assert abs(vit_flops(large) / 1e9 - 162.0) < 0.2  # ViT-L/14 @224 (open_clip profile: 162.03)
    assert 400e9 < pretrain_flops_per_sample(base) < 450e9
