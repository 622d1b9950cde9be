"""Rank-0 training output: progress line and bar, ``metrics.jsonl``, and optional wandb / TensorBoard sinks."""
from __future__ import annotations

import importlib.util
import json
import logging
import netrc
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from mplug_ds.config import ConfigError
from mplug_ds.runtime.atomic import atomic_write_text

log = logging.getLogger("mplug_ds.train")

REPORT_TARGETS = ("wandb", "tensorboard", "none")
METRICS_FILE = "metrics.jsonl"


def check_report_to(targets: Sequence[str]) -> list[str]:
    """Validate ``logging.report_to``; a requested sink whose package is missing is a ``ConfigError``."""
    chosen = []
    for target in targets:
        if target not in REPORT_TARGETS:
            raise ConfigError(f"logging.report_to: unknown target '{target}' (choose from {', '.join(REPORT_TARGETS)})")
        if target == "none":
            continue
        package = "wandb" if target == "wandb" else "tensorboard"
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"logging.report_to: '{target}' needs the '{package}' package "
                              f"(pip install {package}), or drop it from --report-to")
        chosen.append(target)
    return chosen


def wandb_has_key() -> bool:
    """True when a wandb API key is configured (environment or ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated (GiB); on CPU, the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 2**20 if sys.platform != "darwin" else rss_kb / 2**30


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_progress(record: dict[str, Any], total_steps: int, eta_s: float | None = None) -> str:
    """One progress line: step, each loss, learning rates, throughput, ETA, data wait vs compute, peak memory."""
    losses = " ".join(f"{k.removeprefix('loss_') if k != 'loss' else 'loss'} {v:.4f}"
                      for k, v in record.items() if k.startswith("loss"))
    skipped = record.get("skipped", {})
    skipped_part = ""
    if any(e["corrupt_samples"] or e["damaged_shards"] for e in skipped.values()):
        skipped_part = " | skipped " + ", ".join(f"{name} {e['corrupt_samples']}/{e['read']}"
                                                for name, e in skipped.items())
    eta = f" | ETA {format_duration(eta_s)}" if eta_s is not None else ""
    return (f"step {record['step']}/{total_steps} epoch {record['epoch']} | {losses} | "
            f"lr {record['lr']:.2e} visual_lr {record['visual_lr']:.2e} | {record['samples_per_s']:.1f} samples/s"
            f"{eta} | data {record['data_time']:.3f}s compute {record['compute_time']:.3f}s | "
            f"peak mem {record['peak_mem_gb']:.2f} GB{skipped_part}")


class RunLogger:
    """Writes metrics on rank 0 only (other ranks hold an inert instance)."""

    def __init__(self, output_dir: Path, rank: int, total_steps: int, every_steps: int,
                 report_to: Sequence[str], run_config: dict[str, Any], progress_bar: bool,
                 wandb_project: str = "mplug_ds") -> None:
        self.active = rank == 0
        self.total_steps = total_steps
        self.every_steps = max(1, every_steps)
        self.sinks: list[Any] = []
        self.bar = None
        self._tensorboard = None
        self._wandb = None
        self._first: tuple[int, float] | None = None  # (step, time) of this session's first step: the ETA's base
        if not self.active:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = output_dir / METRICS_FILE
        self._metrics = self.metrics_path.open("a")
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
            self._tensorboard.add_text("config", "```\n" + yaml.safe_dump(run_config, sort_keys=False) + "```", 0)
        if "wandb" in report_to:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if wandb_has_key() else "offline")
            self._wandb = wandb.init(project=wandb_project, dir=str(output_dir), config=run_config, mode=mode,
                                     resume="allow")
            if mode == "offline":
                log.info("wandb: no API key configured, logging offline (sync later with `wandb sync %s`)",
                         output_dir / "wandb")
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def drop_steps_after(self, step: int) -> int:
        """Remove records of steps after ``step`` (a run killed after its last checkpoint logged them; the resumed
        run logs them again), so ``metrics.jsonl`` keeps one history. Returns how many records were dropped."""
        if not self.active:
            return 0
        self._metrics.close()
        kept, dropped = [], 0
        for line in self.metrics_path.read_text().splitlines(keepends=True):
            try:
                superseded = json.loads(line).get("step", 0) > step
            except (json.JSONDecodeError, AttributeError, TypeError):
                superseded = True  # a line cut short by the kill
            dropped += superseded
            if not superseded:
                kept.append(line)
        if dropped:
            atomic_write_text(self.metrics_path, "".join(kept))
        self._metrics = self.metrics_path.open("a")
        return dropped

    def event(self, kind: str, **fields: Any) -> None:
        """A non-step record (run start, resume, skipped step, checkpoint, summary) in ``metrics.jsonl``."""
        if self.active:
            self._write({"event": kind, "time": time.time(), **fields})

    def step(self, record: dict[str, Any]) -> None:
        """Log one optimizer step: always to ``metrics.jsonl``; the progress line every ``every_steps``."""
        if not self.active:
            return
        self._write({"event": "step", "time": time.time(), **record})
        step = record["step"]
        if self._first is None:
            self._first = (step, time.monotonic())
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}")
        if step % self.every_steps == 0 or step == self.total_steps:
            line = format_progress(record, self.total_steps, self.eta(step))
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def evaluation(self, step: int, final: bool, metrics: dict[str, Any]) -> None:
        """Log one evaluation: ``metrics.jsonl``, ``eval/*`` scalars in TensorBoard / wandb, and a line on the
        console for an evaluation during training (the launch script prints the final one in full)."""
        if not self.active:
            return
        self._write({"event": "eval", "time": time.time(), "step": step, "final": final, **metrics})
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(f"eval/{key}", value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log({f"eval/{k}": v for k, v in scalars.items()}, step=step)
        if not final:
            shown = (f"{k} {int(v)}" if float(v).is_integer() and abs(v) > 1 else f"{k} {v:.4f}"
                     for k, v in scalars.items())
            self.info(f"eval at step {step}: " + " ".join(shown))

    def eta(self, step: int) -> float | None:
        """Seconds to ``total_steps`` at this session's mean step time so far (``None`` until two steps are seen)."""
        if self._first is None or step <= self._first[0]:
            return None
        first_step, first_time = self._first
        return (time.monotonic() - first_time) / (step - first_step) * max(0, self.total_steps - step)

    def info(self, message: str) -> None:
        """A human-readable line on rank 0 (kept clear of the progress bar)."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        """Flush and close every sink."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self._metrics.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            wandb.teardown()  # waits until the run is written: the entry points end with os._exit (no atexit hooks)

    def _write(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
