"""Run guards: a SIGTERM request to checkpoint and stop, and the non-finite-loss skip/abort rule."""
from __future__ import annotations

import signal
from contextlib import contextmanager
from types import FrameType
from typing import Iterator


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run is diverging."""


class StopRequest:
    """Turns SIGTERM (preemption, ``scancel``, ``kill``) or ``request()`` into a flag the loop checks between
    steps; ``cause`` says why ("received SIGTERM", "its launcher … exited")."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> None:
        self.requested = False
        self.cause = ""
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.request(f"received {signal.Signals(signum).name}")

    def request(self, cause: str) -> None:
        """Ask the loop to checkpoint and stop (from a signal handler or a watcher thread)."""
        if not self.requested:
            self.cause = cause
        self.requested = True

    def restore(self) -> None:
        """Reinstall the handlers that were active before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextmanager
def sigterm_blocked() -> Iterator[None]:
    """Block SIGTERM in this thread for the duration; a signal arriving meanwhile is delivered afterwards.

    Processes started inside (DataLoader workers) inherit the blocked mask, so a SIGTERM sent to the whole
    process group (Slurm, the deepspeed launcher) no longer kills them mid-step: the main process alone
    handles it and stops at a step boundary with a checkpoint.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class NonFiniteGuard:
    """Skip a batch whose loss is NaN/inf (on any rank); abort after ``max_in_row`` such batches in a row."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0

    def observe(self, finite: bool) -> bool:
        """Record one batch; returns True when it must be skipped. Raises ``NonFiniteLossError`` at the limit."""
        if finite:
            self.in_row = 0
            return False
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.max_in_row:
            raise NonFiniteLossError(
                f"{self.in_row} non-finite losses in a row (limit run.max_nonfinite_steps={self.max_in_row}); "
                "stopping. Lower optim.lr, check the data, or resume from the last checkpoint with bf16")
        return True
