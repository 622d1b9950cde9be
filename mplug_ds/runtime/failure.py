"""Ending a job promptly: a failing rank exits hard, and a rank notices when its launcher has gone.

Two ways a distributed job used to outlive its purpose:

* A rank raised after its DataLoader had started. Python then runs its exit handlers, and multiprocessing's
  handler terminates the loader workers with SIGTERM and waits for them; the workers block SIGTERM (see
  ``guards.sigterm_blocked``), so the rank never exited and the launcher never tore the job down.
  ``exit_hard_on_failure`` prints the traceback, kills this rank's child processes and ends the process at
  once with a non-zero status (the entry points end a successful run through ``hard_exit(0)`` too, for the
  same reason). The launcher (deepspeed, torchrun) sees the failure and stops the other ranks;
  a rank blocked in a collective with the dead rank gets a connection error (or, at the latest, the
  ``run.collective_timeout_s`` timeout) and takes the same exit.
  With more than one rank the hang watchdog (``runtime.watchdog``) first writes this rank's state and its part of
  the job's hang report (``report_failures_with``), so a failure on one rank and the lost peer the others see
  end in one ``RUN/hang/report.txt`` naming the rank that failed.
* The ``deepspeed`` launcher was stopped on its own (a scheduler or Ctrl-C signalling only it). On one node it
  forwards nothing to the ranks. ``LauncherWatch`` notices that a launcher process above this rank is gone
  and turns it into a stop request: the ranks agree, save a checkpoint and exit.
"""
from __future__ import annotations

import os
import sys
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import psutil

EXIT_FAILURE = 1
_failure_report: Callable[[BaseException], None] | None = None
# Command-line words that mark a process as a launcher of this rank (deepspeed's runner and its per-node
# launcher, torchrun). Matched against each word's file name, so "…/bin/deepspeed" matches "deepspeed".
LAUNCHER_WORDS = frozenset({"deepspeed", "deepspeed.launcher.launch", "torchrun", "torch.distributed.run"})


def kill_children() -> None:
    """SIGKILL every descendant of this process (DataLoader workers and whatever they started)."""
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass


def hard_exit(code: int) -> None:
    """Flush stdout/stderr, kill this process's children and end the process now (no exit handlers)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    kill_children()
    os._exit(code)


def report_failures_with(report: Callable[[BaseException], None] | None) -> None:
    """Call ``report(err)`` before a failing rank exits (the hang watchdog's report); None: nothing."""
    global _failure_report
    _failure_report = report


@contextmanager
def exit_hard_on_failure(rank: int) -> Iterator[None]:
    """Any exception inside ends this rank within moments: traceback, the failure report (if any), children
    killed, exit status 1."""
    try:
        yield
    except BaseException as err:  # noqa: BLE001 - every failure must end the process, whatever its type
        if isinstance(err, SystemExit) and err.code in (0, None):
            raise
        traceback.print_exc()
        print(f"rank {rank}: failed ({type(err).__name__}: {err}); exiting with status {EXIT_FAILURE} so the "
              "launcher stops the other ranks", file=sys.stderr, flush=True)
        if _failure_report is not None:
            _failure_report(err)
        hard_exit(EXIT_FAILURE)


def _is_launcher(proc: psutil.Process) -> bool:
    try:
        words = proc.cmdline()
    except psutil.Error:
        return False
    return any(Path(word).name in LAUNCHER_WORDS for word in words[:4])


def launcher_processes() -> list[psutil.Process]:
    """The chain of launcher processes directly above this rank (empty under srun or a plain ``python``)."""
    chain = []
    proc = psutil.Process().parent()
    while proc is not None and proc.pid > 1 and _is_launcher(proc):
        chain.append(proc)
        proc = proc.parent()
    return chain


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class LauncherWatch:
    """Calls ``on_gone(description)`` once when a launcher process above this rank has exited.

    Polls from a daemon thread every ``interval`` seconds; ``stop()`` ends the polling.
    """

    def __init__(self, on_gone: Callable[[str], None], interval: float = 1.0) -> None:
        self.watched = launcher_processes()
        self._names = {proc.pid: " ".join(Path(w).name for w in proc.cmdline()[:3]) for proc in self.watched}
        self._on_gone, self._interval = on_gone, interval
        self._done = threading.Event()
        self._thread = None
        if self.watched:
            self._thread = threading.Thread(target=self._poll, name="launcher-watch", daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._done.wait(self._interval):
            for proc in self.watched:
                if not _alive(proc):
                    self._on_gone(f"its launcher ({self._names[proc.pid]}, pid {proc.pid}) exited")
                    return

    def stop(self) -> None:
        """Stop watching."""
        self._done.set()
