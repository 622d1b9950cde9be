"""Child processes in tests: one time-out policy, and every child (with all its descendants) killed at the end.

Each call names the seconds its step needs on this 2-core machine; ``MPLUG_DS_TEST_TIMEOUT_SCALE`` (default 1)
multiplies every one of them, e.g. ``MPLUG_DS_TEST_TIMEOUT_SCALE=3 python -m pytest`` on a loaded machine.
Children start in their own process group, so the whole group (a ``deepspeed`` launcher and its ranks, a loader's
workers) is killed in ``finally`` however the test ends.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_SCALE = float(os.environ.get("MPLUG_DS_TEST_TIMEOUT_SCALE", "1"))


def timeout(seconds: float) -> float:
    """``seconds`` scaled by ``MPLUG_DS_TEST_TIMEOUT_SCALE``."""
    return seconds * TIMEOUT_SCALE


def child_env() -> dict[str, str]:
    """Environment for a child run: one thread per process (ranks share this machine's cores), unbuffered."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # set in this process by in-process engine tests
    return env


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group (whatever is left of it) and reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@contextmanager
def started(command: Sequence[str], cwd: Path = REPO) -> Iterator[subprocess.Popen]:
    """Start ``command`` (output: ``proc.stdout``, stderr merged) in its own process group; kill it on exit."""
    proc = subprocess.Popen([str(c) for c in command], cwd=cwd, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        yield proc
    finally:
        kill_group(proc)


def run(command: Sequence[str], seconds: float, cwd: Path = REPO) -> tuple[int, str]:
    """Run ``command`` to completion within ``timeout(seconds)``; returns (exit code, output)."""
    with started(command, cwd) as proc:
        output, _ = proc.communicate(timeout=timeout(seconds))
        return proc.returncode, output


def run_checked(command: Sequence[str], seconds: float, cwd: Path = REPO) -> str:
    """``run``, failing the test with the child's output unless it exits 0. Returns the output."""
    code, output = run(command, seconds, cwd)
    assert code == 0, f"exit code {code}:\n{output[-6000:]}"
    return output


def wait_for(condition: Callable[[], bool], seconds: float, proc: subprocess.Popen | None = None,
             what: str = "condition") -> None:
    """Poll ``condition`` until true; fail if ``proc`` ends first or ``timeout(seconds)`` passes."""
    deadline = time.monotonic() + timeout(seconds)
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended before {what}:\n{proc.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout(seconds):.0f} s"
        time.sleep(0.05)
