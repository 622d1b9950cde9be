"""Training curves of a run as one PNG: per-objective losses, learning rates and throughput from ``metrics.jsonl``."""
from __future__ import annotations

import json
from pathlib import Path

from mplug_ds.engine.logging import METRICS_FILE
from mplug_ds.runtime.atomic import atomic_save_png

PLOT_FILE = "curves.png"


def read_steps(run_dir: Path) -> list[dict]:
    """The step records of ``run_dir/metrics.jsonl``, one per step (after a resume, the re-run steps win)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: RUN_DIR must be a run's output directory (run.output_dir)")
    by_step: dict[int, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:  # a run killed mid-write leaves a partial last line
            if number == len(path.read_text().splitlines()):
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({err})") from err
        if record.get("event") == "step":
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (the raw curve of a tiny batch is too noisy to read)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_run(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write the curves of ``run_dir`` to ``out`` (default ``run_dir/curves.png``) atomically; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    steps = read_steps(run_dir)
    if not steps:
        raise ValueError(f"{run_dir / METRICS_FILE} has no step records yet; nothing to plot")
    out = Path(out) if out is not None else run_dir / PLOT_FILE
    x = [r["step"] for r in steps]
    window = max(1, len(steps) // 25)
    loss_keys = [k for k in steps[0] if k.startswith("loss_")] or ["loss"]  # a task's single loss: "loss"

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for key in loss_keys:
        ax.plot(x, _smooth([r[key] for r in steps], window), label=key.removeprefix("loss_"))
    ax.set_yscale("log")
    ax.set_title(f"losses per objective (mean of {window} steps)" if window > 1 else "losses per objective")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (log scale)")
    ax.legend()

    ax = axes[1]
    ax.plot(x, [r["lr"] for r in steps], label="lr")
    if any(r["visual_lr"] != r["lr"] for r in steps):
        ax.plot(x, [r["visual_lr"] for r in steps], label="visual lr", linestyle="--")
    ax.set_title("learning rate")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.legend()

    ax = axes[2]
    throughput = [r["samples_per_s"] for r in steps]
    ax.plot(x, throughput, alpha=0.3, color="tab:green", label="per step")
    ax.plot(x, _smooth(throughput, window), color="tab:green", label=f"mean of {window} steps")
    ax.set_title("throughput")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("samples / s (all ranks)")
    ax.set_ylim(bottom=0)
    ax.legend()

    fig.suptitle(f"{run_dir}: {len(steps)} steps")
    fig.tight_layout()
    try:
        return atomic_save_png(fig, out, dpi=100)
    finally:
        plt.close(fig)
