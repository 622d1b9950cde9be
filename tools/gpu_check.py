"""The GPU acceptance run: environment, correctness, kernels, throughput and the loader, in one command.

    python tools/gpu_check.py --quick                      # one GPU, ends within 8 minutes whatever fails
    python tools/gpu_check.py                              # the same steps with longer measurements
    python tools/gpu_check.py --cpu                        # every step that can run on a CPU, tiny sizes (CI)
    python tools/gpu_check.py --quick --only throughput --out $OUT/gpu_report.json

Steps, in order (each timed, each with its own time-out; a failure is recorded and the next step still runs):
  environment                     torch / CUDA / DeepSpeed versions, device, bf16, measured matmul and copy ceilings
  correctness.bf16                a bf16 pre-training step on ZeRO-1/2/3; the momentum teacher stays fp32
  correctness.fp16                the same in fp16 with dynamic loss scaling (CUDA only)
  correctness.grad_checkpointing  activation checkpointing on and off: same losses and gradients
  correctness.cuda_vs_cpu         a fixed-seed fp32 step on CUDA equals the same step on the CPU
  kernels                         sdpa reaches the fused kernels (ViT; padded text), the fused AdamW is stepped
  throughput.base                 tools/benchmark.py, mplug.en.base 256 px bf16 at the largest micro-batch, vs eager
  throughput.base_checkpointing   ... with activation checkpointing on, against off
  throughput.base_timix           ... the TiMix step against the plain step
  throughput.large                mplug.en.large 224 px at its largest micro-batch
  throughput.huge                 mplug.en.huge 224 px, ZeRO-3, at its largest micro-batch
  loader                          tools/benchmark_data.py on every core

The steps run in a worker process (tools/gpu_check_worker.py). A step that passes its time-out, or a worker that
dies, is recorded as failed and a fresh worker continues with the next step; so does any step that raised.
``--quick`` also stops starting steps once its time budget is spent (those are reported as skipped). Writes
``--out`` (gpu_report.json: every step passed, failed or skipped, with its checks, figures and seconds), the
workers' output to ``--log``, and prints a table. Exit status 1 when a step failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mplug_ds.runtime.atomic import atomic_write_text

STEPS_SCRIPT = Path(__file__).resolve().parent / "gpu_check_worker.py"
QUICK_BUDGET_S = 440.0  # --quick: steps start only within this many seconds (8 minutes with the kit's install)
# A worker that has not started its first step by then is stuck (imports, CUDA init); a shared CPU can be slow.
WORKER_START_S = {"quick": 240.0, "full": 240.0, "cpu": 900.0}
POLL_S = 0.1


@dataclass(frozen=True)
class PlannedStep:
    """A step of the check and its time-out (seconds) per mode."""

    name: str
    quick: float
    full: float
    cpu: float

    def timeout(self, mode: str) -> float:
        return getattr(self, mode)


PLAN = [
    PlannedStep("environment", 60, 120, 120),
    PlannedStep("correctness.bf16", 90, 180, 240),
    PlannedStep("correctness.fp16", 90, 180, 60),
    PlannedStep("correctness.grad_checkpointing", 60, 120, 180),
    PlannedStep("correctness.cuda_vs_cpu", 120, 180, 120),
    PlannedStep("kernels", 90, 180, 180),
    PlannedStep("throughput.base", 150, 420, 240),
    PlannedStep("throughput.base_checkpointing", 60, 180, 120),
    PlannedStep("throughput.base_timix", 90, 240, 180),
    PlannedStep("throughput.large", 90, 240, 120),
    PlannedStep("throughput.huge", 120, 360, 180),
    PlannedStep("loader", 60, 180, 120),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true",
                       help=f"short measurements; steps start within a {QUICK_BUDGET_S:.0f} s budget")
    which.add_argument("--cpu", action="store_true", help="every step that can run on the CPU, at tiny sizes")
    parser.add_argument("--out", type=Path, default=Path("gpu_report.json"), help="the JSON report")
    parser.add_argument("--log", type=Path, default=None, help="the workers' output (default: gpu_check.log beside "
                                                                "--out)")
    parser.add_argument("--only", default=None,
                        help="comma-separated step names or prefixes (e.g. 'environment,throughput')")
    parser.add_argument("--step-timeout", action="append", default=[], metavar="STEP=SECONDS",
                        help="change one step's time-out (repeatable)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds after which no further step starts (default: {QUICK_BUDGET_S:.0f} with "
                             "--quick, none otherwise)")
    parser.add_argument("--kit", type=Path, default=None,
                        help="the carry kit the run was installed from (tools/gpu_bundle.sh); its build info is "
                             "reported")
    args = parser.parse_args(argv)
    args.mode = "quick" if args.quick else "cpu" if args.cpu else "full"
    args.log = args.log or args.out.parent / "gpu_check.log"
    if args.budget is None and args.quick:
        args.budget = QUICK_BUDGET_S
    return args


def select_steps(only: str | None) -> list[PlannedStep]:
    """The planned steps ``--only`` names (a name or a prefix before a dot), in plan order."""
    if not only:
        return list(PLAN)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    chosen = [s for s in PLAN if any(s.name == w or s.name.startswith(w + ".") for w in wanted)]
    unmatched = [w for w in wanted if not any(s.name == w or s.name.startswith(w + ".") for s in PLAN)]
    if unmatched:
        raise SystemExit(f"--only: no step named '{unmatched[0]}'; steps: {', '.join(s.name for s in PLAN)}")
    return chosen


def step_timeouts(steps: list[PlannedStep], mode: str, overrides: list[str]) -> dict[str, float]:
    """Each step's time-out in this mode, with ``--step-timeout STEP=SECONDS`` applied."""
    timeouts = {s.name: s.timeout(mode) for s in steps}
    for item in overrides:
        name, _, seconds = item.partition("=")
        if name not in timeouts:
            raise SystemExit(f"--step-timeout {item}: '{name}' is not a step of this run ({', '.join(timeouts)})")
        try:
            timeouts[name] = float(seconds)
        except ValueError:
            raise SystemExit(f"--step-timeout {item}: '{seconds}' is not a number of seconds") from None
    return timeouts


class Runner:
    """Runs the steps in worker processes: one worker until a step fails, times out or the worker dies."""

    def __init__(self, args: argparse.Namespace, steps: list[PlannedStep], scratch: Path) -> None:
        self.args, self.scratch = args, scratch
        self.pending = [s.name for s in steps]
        self.timeouts = step_timeouts(steps, args.mode, args.step_timeout)
        self.events = scratch / "events.jsonl"
        self.events.touch()
        self.results: dict[str, dict[str, Any]] = {}
        self.started = time.monotonic()
        self.deadline = self.started + args.budget if args.budget else None

    def run(self) -> dict[str, dict[str, Any]]:
        """Every pending step's result, by name."""
        with self.args.log.open("a") as log:
            while self.pending:
                if self.out_of_budget():
                    break
                self.run_worker(log)
        for name in self.pending:
            self.results[name] = {"step": name, "status": "skipped", "seconds": 0.0, "checks": [], "figures": {},
                                  "summary": f"not started: the run's {self.args.budget:.0f} s budget was spent"}
        return self.results

    def out_of_budget(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def run_worker(self, log) -> None:
        """Start a worker on the pending steps and follow its events until it exits or is killed."""
        command = [sys.executable, str(STEPS_SCRIPT), "--mode", self.args.mode, "--steps", ",".join(self.pending),
                   "--events", str(self.events), "--scratch", str(self.scratch / "work"),
                   *(["--kit", str(self.args.kit)] if self.args.kit else [])]
        log.write(f"\n=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} worker: "
                  f"{shlex.join(command)}\n")
        log.flush()
        worker = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"))
        launched, seen_event, partial = time.monotonic(), False, ""
        current: tuple[str, float, float] | None = None  # (step, started at, time-out)
        with self.events.open() as feed:
            feed.seek(0, os.SEEK_END)
            try:
                while True:
                    exited = worker.poll() is not None  # read the events after polling: none is missed at exit
                    *lines, partial = (partial + feed.read()).split("\n")  # whole lines only
                    for line in lines:
                        event, seen_event = json.loads(line), True
                        if event["event"] == "start":
                            current = (event["step"], time.monotonic(), self.effective_timeout(event["step"]))
                        else:
                            self.finish(event)
                            current = None
                    now = time.monotonic()
                    if current is not None and now - current[1] > current[2]:
                        name, began, timeout = current
                        cut = " (cut to what was left of the run's budget)" if timeout < self.timeouts[name] else ""
                        self.fail(name, now - began, f"timed out after {timeout:.0f} s{cut}, killed; {self.log_tail()}")
                        return
                    if exited:
                        if current is not None:
                            self.fail(current[0], now - current[1], f"the worker exited with status "
                                                                     f"{worker.returncode} during the step; {self.log_tail()}")
                        elif not seen_event and self.pending:
                            self.fail(self.pending[0], 0.0, f"the worker exited with status {worker.returncode} "
                                                             f"before starting the step; {self.log_tail()}")
                        return
                    start_limit = WORKER_START_S[self.args.mode]
                    if not seen_event and now - launched > start_limit:
                        self.fail(self.pending[0], 0.0, f"the worker started no step within {start_limit:.0f} s, "
                                                         f"killed; {self.log_tail()}")
                        return
                    if current is None and self.out_of_budget():
                        return
                    time.sleep(POLL_S)
            finally:
                kill_group(worker)

    def effective_timeout(self, name: str) -> float:
        """The step's own time-out, cut to what is left of the run's budget."""
        timeout = self.timeouts[name]
        if self.deadline is not None:
            timeout = max(1.0, min(timeout, self.deadline - time.monotonic()))
        return timeout

    def finish(self, event: dict[str, Any]) -> None:
        self.results[event["step"]] = {k: v for k, v in event.items() if k not in ("event", "time")}
        self.pending.remove(event["step"])

    def fail(self, name: str, seconds: float, why: str) -> None:
        self.results[name] = {"step": name, "status": "failed", "seconds": round(seconds, 2), "checks": [],
                              "figures": {}, "summary": why.split(";")[0], "error": why}
        self.pending.remove(name)

    def log_tail(self, lines: int = 15) -> str:
        text = self.args.log.read_text(errors="replace").splitlines()
        return "last lines of the log:\n" + "\n".join(text[-lines:])


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's process group (its loader workers and helper processes too) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def build_report(args: argparse.Namespace, steps: list[PlannedStep], results: dict[str, dict[str, Any]],
                 started: str, seconds: float) -> dict[str, Any]:
    ordered = [results[s.name] for s in steps]
    counts = {status: sum(r["status"] == status for r in ordered) for status in ("passed", "failed", "skipped")}
    environment = results.get("environment", {}).get("figures", {})
    return {"tool": "tools/gpu_check.py", "command": shlex.join([sys.argv[0], *sys.argv[1:]]), "mode": args.mode,
            "started": started, "seconds": round(seconds, 1), "device": environment.get("device"),
            "kit": environment.get("kit"), "summary": counts, "steps": ordered}


def format_table(report: dict[str, Any]) -> str:
    """The report as text: one line per step, then its failed and skipped checks, then the throughput runs."""
    width = max(len(s["step"]) for s in report["steps"])
    lines = [f"{'step':<{width}}  {'status':<7}  {'seconds':>7}  result", "-" * (width + 40)]
    notes = []
    for step in report["steps"]:
        lines.append(f"{step['step']:<{width}}  {step['status']:<7}  {step['seconds']:>7.1f}  {step['summary']}")
        for check in step["checks"]:
            if check["status"] != "passed":
                notes.append(f"  {check['status']:<7} {step['step']}: {check['name']}: {check['detail']}")
        if step.get("error") and not any(c["status"] == "failed" for c in step["checks"]):
            lines_of_error = step["error"].strip().splitlines()
            why = lines_of_error[-1] if lines_of_error[0].startswith("Traceback") else lines_of_error[0]
            notes.append(f"  failed  {step['step']}: {why}")
    runs = [r for s in report["steps"] if s["step"].startswith("throughput") for r in s["figures"].get("runs", [])]
    if notes:
        lines += ["", "checks not passed:", *notes]
    if runs:
        lines += ["", (f"{'model':<15} {'attn':<6} {'ckpt':<4} {'timix':<5} {'zero':>4} {'batch':>5} "
                       f"{'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}")]
        for r in runs:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            lines.append(f"{r['model']:<15} {r['attn']:<6} {'on' if r['grad_checkpointing'] else 'off':<4} "
                         f"{'on' if r['timix'] else 'off':<5} {r['zero']:>4} {r['batch_per_device']:>5} "
                         f"{r['samples_per_s']:>10.2f} {r['tflops_per_device']:>8.3f} {mfu:>6} "
                         f"{r['peak_memory_gb']:>8.2f}")
    s = report["summary"]
    lines += ["", (f"{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped ({report['mode']}, "
                   f"{report['seconds']:.0f} s); report: {report['path']}")]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    steps = select_steps(args.only)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started, clock = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        results = Runner(args, steps, Path(scratch)).run()
    report = build_report(args, steps, results, started, time.monotonic() - clock)
    atomic_write_text(args.out, json.dumps(report, indent=1, default=str))
    print(format_table({**report, "path": str(args.out)}), flush=True)
    sys.exit(1 if report["summary"]["failed"] else 0)


if __name__ == "__main__":
    main()
