"""tools/gpu_check.py: the GPU acceptance run, here in its --cpu mode (same steps and code paths, tiny sizes)."""
import json
import sys

import pytest

from tests.processes import REPO, run, run_checked

TOOLS = REPO / "tools"
sys.path.insert(0, str(TOOLS))

import gpu_check  # tools/ is not a package
import gpu_check_worker
from gpu_check_throughput import fit_micro_batch

CUDA_ONLY = {"correctness.fp16", "correctness.cuda_vs_cpu"}  # skipped as a whole on a CPU


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One ``--cpu`` run shared by the tests below: (report, printed table)."""
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_report.json"
    printed = run_checked([sys.executable, TOOLS / "gpu_check.py", "--cpu", "--out", out], 300)
    return json.loads(out.read_text()), printed


@pytest.mark.slow
def test_cpu_run_passes_every_step_it_can_and_names_why_the_others_are_skipped(cpu_run):
    report, printed = cpu_run
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == [s.name for s in gpu_check.PLAN]  # every step reported, in order
    assert report["summary"] == {"passed": len(steps) - len(CUDA_ONLY), "failed": 0, "skipped": len(CUDA_ONLY)}
    for name, step in steps.items():
        assert step["status"] == ("skipped" if name in CUDA_ONLY else "passed"), step
        assert step["seconds"] >= 0 and step["summary"]
        for check in step["checks"]:
            assert check["status"] in ("passed", "skipped"), (name, check)
            if check["status"] == "skipped":  # a reason a reader can act on
                assert any(word in check["detail"] for word in ("CUDA", "CPU", "GPU", "--cpu")), (name, check)
        assert name in printed  # the table lists it
    assert "0 failed" in printed


@pytest.mark.slow
def test_cpu_run_really_trains_checks_and_measures(cpu_run):
    report, _ = cpu_run
    steps = {s["step"]: s for s in report["steps"]}
    checks = {c["name"]: c for s in report["steps"] for c in s["checks"]}
    # Correctness ran on the real engine: ZeRO-1/2/3 agree, the teacher stays fp32 and follows the fp32 master.
    first = steps["correctness.bf16"]["figures"]["first_loss"]
    assert len(first) == 3 and max(first.values()) - min(first.values()) <= 1e-2 * max(first.values())
    for stage in (1, 2, 3):
        assert checks[f"ZeRO-{stage} bf16: the teacher moved by the EMA of the fp32 master weights"]["status"] == "passed"
    assert steps["correctness.grad_checkpointing"]["figures"]["grad_gap"] <= 2e-2
    # Kernels: PyTorch's own dispatch was observed (the CPU's fused flash kernel), never the math fallback.
    used = steps["kernels"]["figures"]["sdpa_kernels_default_dispatch"]
    assert used and not any("math" in k for k in used)
    assert checks["DeepSpeed's step runs torch's fused AdamW kernel (aten::_fused_adamw_)"]["status"] == "passed"
    # Throughput came from tools/benchmark.py's measurement: every comparison the GPU run makes, on tiny.
    runs = [r for name, s in steps.items() if name.startswith("throughput") for r in s["figures"]["runs"]]
    assert {(r["attn"], r["grad_checkpointing"], r["timix"]) for r in runs} >= {
        ("sdpa", False, False), ("eager", False, False), ("sdpa", True, False), ("sdpa", False, True)}
    assert all(r["samples_per_s"] > 0 and r["skipped_batches"] == 0 for r in runs)
    assert steps["throughput.huge"]["figures"]["runs"][0]["zero"] == 3
    assert steps["loader"]["figures"]["images_per_s"] > 0


@pytest.mark.slow
def test_a_step_past_its_timeout_is_killed_and_reported_and_the_next_step_runs_in_a_new_worker(tmp_path):
    out = tmp_path / "gpu_report.json"
    code, printed = run([sys.executable, TOOLS / "gpu_check.py", "--cpu", "--only", "throughput.base,loader",
                         "--step-timeout", "throughput.base=1", "--out", out], 300)
    assert code == 1, printed  # a failed step fails the command
    report = json.loads(out.read_text())
    base, loader = report["steps"]
    assert base["step"] == "throughput.base" and base["status"] == "failed", printed
    assert base["error"].startswith("timed out after 1 s") and "last lines of the log" in base["error"], printed
    assert loader["status"] == "passed" and loader["figures"]["images_per_s"] > 0, printed
    log = (tmp_path / "gpu_check.log").read_text()
    assert log.count("worker: ") == 2, log[-3000:]  # the loader ran in a fresh worker
    assert "1 passed, 1 failed, 0 skipped" in printed


def test_micro_batch_fit_extrapolates_peak_memory_to_the_device_and_rounds_down():
    # 10 GiB of weights and optimizer state plus 0.25 GiB per sample: 100 GiB fit 360 samples.
    assert fit_micro_batch([(16, 14.0), (32, 18.0)], capacity_gib=100.0) == 360
    assert fit_micro_batch([(32, 18.0), (16, 14.0)], capacity_gib=100.5) == 360  # multiple of 8, order-free
    assert fit_micro_batch([(16, 14.0), (32, 18.0)], capacity_gib=1000.0) == 512  # the limit
    assert fit_micro_batch([(16, 14.0), (32, 14.0)], capacity_gib=100.0) == 32  # no growth seen: the larger probe
    assert fit_micro_batch([(2, 5.0), (4, 6.0)], capacity_gib=9.0) == 8


def test_the_plan_names_every_step_the_worker_runs_in_the_issue_order():
    assert [s.name for s in gpu_check.PLAN] == list(gpu_check_worker.STEPS)
    with pytest.raises(SystemExit, match="no step named 'throughput.tiny'"):
        gpu_check.select_steps("kernels,throughput.tiny")
    assert [s.name for s in gpu_check.select_steps("throughput")][:2] == ["throughput.base",
                                                                         "throughput.base_checkpointing"]
