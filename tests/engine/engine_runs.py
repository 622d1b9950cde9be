"""Helpers to run ``launch/pretrain.py`` under the real ``deepspeed`` launcher (2 CPU ranks, gloo) in tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mplug_ds.runtime.launch_env import free_port

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "launch" / "pretrain.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def run_env() -> dict[str, str]:
    """Environment for a child run: one thread per rank (2 ranks share this machine's cores), unbuffered."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # set in this process by in-process engine tests
    return env


def deepspeed_command(out_dir: Path, args: list[str], num_ranks: int = 2) -> list[str]:
    """``deepspeed --num_gpus N launch/pretrain.py ARGS run.output_dir=OUT`` on a free port."""
    return [str(DEEPSPEED), "--master_port", str(free_port()), "--num_gpus", str(num_ranks), str(PRETRAIN),
            *args, f"run.output_dir={out_dir}"]


def start(command: list[str]) -> subprocess.Popen:
    """Start a run in its own process group (so a test can kill the launcher and every rank at once)."""
    return subprocess.Popen(command, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def run(command: list[str], timeout: float = 300) -> str:
    """Run to completion; fail with the run's output if it exits non-zero. Returns the output."""
    proc = subprocess.run(command, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc.stdout


def records(out_dir: Path) -> list[dict]:
    """Every record of ``metrics.jsonl``."""
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(out_dir: Path, after_resume: bool = False) -> dict[int, dict]:
    """Step records by step number (the last run's, or only those after the last resume)."""
    rows = records(out_dir)
    if after_resume:
        last = max(i for i, r in enumerate(rows) if r["event"] == "resume")
        rows = rows[last:]
    return {r["step"]: r for r in rows if r["event"] == "step"}
