"""Helpers to run ``launch/pretrain.py`` under the real ``deepspeed`` launcher or torchrun (2 CPU ranks, gloo) in
tests."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mplug_ds.runtime.launch_env import free_port
from tests.processes import REPO, child_env, kill_group, run_checked, timeout

PRETRAIN = REPO / "launch" / "pretrain.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
RANKS = REPO / "tests" / "ranks.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def launch(script: Path, args: list, num_ranks: int = 2, launcher: str = "ranks") -> list[str]:
    """The command that runs ``script ARGS`` on ``num_ranks`` CPU ranks on a free port: under ``tests/ranks.py``
    (the default: torchrun's rank environment, none of the ``deepspeed`` launcher's start-up) or, with
    ``launcher="deepspeed"``, the real ``deepspeed --num_gpus N`` where the launcher's own behaviour is tested."""
    if launcher == "deepspeed":
        head = [str(DEEPSPEED), "--master_port", str(free_port()), "--num_gpus", str(num_ranks)]
    else:
        head = [sys.executable, str(RANKS), "--num_ranks", str(num_ranks), "--master_port", str(free_port())]
    return [*head, str(script), *map(str, args)]


def deepspeed_command(out_dir: Path, args: list[str], num_ranks: int = 2, launcher: str = "ranks") -> list[str]:
    """``launch/pretrain.py ARGS run.output_dir=OUT`` on ``num_ranks`` ranks (see ``launch``)."""
    return launch(PRETRAIN, [*args, f"run.output_dir={out_dir}"], num_ranks, launcher)


def torchrun_command(out_dir: Path, args: list[str], num_ranks: int = 2) -> list[str]:
    """``torchrun --nproc_per_node N launch/pretrain.py ARGS run.output_dir=OUT`` on a free port (one launcher
    process that imports only torch: seconds less per run than deepspeed's two)."""
    return [str(TORCHRUN), "--nproc_per_node", str(num_ranks), "--master_port", str(free_port()), str(PRETRAIN),
            *args, f"run.output_dir={out_dir}"]


def run(command: list[str], seconds: float = 300) -> str:
    """Run to completion; fail with the run's output if it exits non-zero. Returns the output."""
    return run_checked(command, seconds)


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


TIMIX_KEYS = ("loss_pta", "pta_accuracy", "pta_precision", "pta_recall", "loss_mix", "gamma", "mix_lambda_mean",
              "mix_lambda_min", "mix_lambda_max", "mix_side_mean")


def assert_timix_trained(rows: dict[int, dict], out_dir: Path) -> None:
    """A 3-step demo_timix run (gamma ramp of 2 steps) logged finite TiMix losses, mixed from step 3 on, and saved
    its patch predictor's layer in the model config."""
    for row in rows.values():
        assert all(math.isfinite(row[k]) for k in ("loss", *TIMIX_KEYS)), row
        assert 0 <= row["pta_recall"] <= 1 and 0 < row["pta_positive_rate"] < 1
    assert rows[1]["gamma"] == 0 and rows[1]["loss_mix"] == 0
    assert rows[3]["gamma"] == 1 and rows[3]["loss_mix"] > 0 and rows[3]["mix_side_mean"] >= 2
    assert (out_dir / "model_config.yaml").read_text().count("patch_predictor_layer: 1")


FAULTS = Path(__file__).resolve().parent / "faults"


@dataclass
class Ended:
    """How a run ended: exit code of the launcher, its output, and seconds from the mark to the last exit."""

    code: int
    output: str
    seconds: float


def run_until_all_exit(command: list[str], limit: float = 60.0, mark: str | None = None, fault: str | None = None,
                       startup: float = 300.0, on_mark: Callable[[subprocess.Popen], None] | None = None,
                       env: dict[str, str] | None = None) -> Ended:
    """Run in a new process group and wait until every process in it has exited.

    Fails when that takes more than ``limit`` seconds after ``mark`` first appears in the output (from the
    start without a mark; the mark itself may take ``startup`` seconds). ``fault`` sets ``MPLUG_DS_FAULT`` and
    puts ``tests/engine/faults`` first on the ranks' path; ``on_mark(proc)`` runs once the mark is seen. The whole
    group is SIGKILLed on the way out. ``limit`` and ``startup`` are scaled by ``MPLUG_DS_TEST_TIMEOUT_SCALE``.
    ``env``: the environment to start from (default ``child_env()``).
    """
    limit, startup = timeout(limit), timeout(startup)
    env = dict(env) if env is not None else child_env()
    if fault:
        env["MPLUG_DS_FAULT"] = fault
        env["PYTHONPATH"] = os.pathsep.join([str(FAULTS), *filter(None, [env.get("PYTHONPATH")])])
    started = time.monotonic()
    marked: list[float] = [] if mark else [started]
    lines: list[str] = []
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if not marked and mark in line:
                marked.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    acted = False
    try:
        while True:
            if marked and on_mark is not None and not acted:
                on_mark(proc)
                acted = True
            proc.poll()
            if not group_alive(proc.pid):
                break
            now = time.monotonic()
            assert marked or now - started < startup, f"'{mark}' not seen in {startup:.0f} s:\n{''.join(lines)[-6000:]}"
            assert not marked or now - marked[0] < limit, (
                f"processes still running {limit:.0f} s after {mark or 'the start'}:\n{''.join(lines)[-6000:]}")
            time.sleep(0.2)
        reader.join(timeout=10)
        return Ended(proc.wait(), "".join(lines), time.monotonic() - marked[0])
    finally:
        kill_group(proc)


def group_alive(pgid: int) -> bool:
    """True while any process of the process group ``pgid`` (zombies excluded) exists."""
    import psutil

    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError):
            continue
    return False
