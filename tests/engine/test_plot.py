"""`tools/plot_run.py RUN_DIR` draws a run's curves from metrics.jsonl; retrieval chance levels are exact."""
import json
import subprocess
import sys


from tests.engine.engine_runs import REPO


def _write_metrics(run_dir, steps):
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"event": "start"}]
    rows += [{"event": "step", "step": s, "loss": 9.0 / s, "loss_ita": 2.5 / s, "loss_itm": 0.6, "loss_mlm": 3.0 / s,
              "loss_prefix": 2.9 / s, "lr": 1e-3 * min(1, s / 5), "visual_lr": 5e-4, "samples_per_s": 30.0 + s % 3}
             for s in range(1, steps + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"event": "st')


def test_plot_run_writes_a_png_of_the_curves(tmp_path):
    _write_metrics(tmp_path / "run", 40)  # the last line was cut by a kill mid-write
    proc = subprocess.run([sys.executable, "tools/plot_run.py", str(tmp_path / "run")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    png = tmp_path / "run" / "curves.png"
    assert proc.stdout.strip() == str(png) and png.read_bytes().startswith(b"\x89PNG")


def test_plot_run_names_a_directory_without_metrics(tmp_path):
    proc = subprocess.run([sys.executable, "tools/plot_run.py", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "metrics.jsonl not found" in proc.stderr
