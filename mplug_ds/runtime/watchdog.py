"""The hang watchdog: when a rank makes no progress, every rank writes where it is, one rank merges a report, and
every rank exits non-zero.

One daemon thread per rank (``HangWatchdog``). The training loop and the evaluations report progress through
``phase(kind, step)`` (a new part of the run: a training step, an evaluation, a checkpoint) and ``beat(**where)``
(progress inside it); both only store a few values. The thread wakes every ``poll_s`` seconds and stops the job
when

* this rank made no progress for its deadline (``run.hang_timeout_s``, or automatic: ``AUTO_FACTOR`` × the
  slowest interval between progress reports so far, at least ``AUTO_MIN_S``; ``long`` phases — start-up, the
  first step of a session, checkpoints — get ``long_timeout_s``, just under the backend's collective time-out), or
* another rank has stopped: it left ``RUN/hang/trigger.json`` for this session.

A rank that raises (``runtime.failure.exit_hard_on_failure``) goes through the same steps from its main thread.
Stopping means: write ``RUN/hang/rank_XXXXX.txt`` (``hang_report.RankDump`` plus every thread's stack, the last
collectives, the data position), then rank 0 waits up to ``grace_s`` for every rank's file and writes
``RUN/hang/report.txt`` (without rank 0's file, the lowest rank with one does), and the process exits with
``EXIT_HANG`` (1 after an exception). The ranks never talk over the process group here (it may be what hangs):
they meet in the run directory, which must therefore be on a filesystem every node shares (docs/multi_node.md).
"""
from __future__ import annotations

import faulthandler
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any, Callable

from mplug_ds.runtime import collectives, failure
from mplug_ds.runtime.atomic import atomic_write_text
from mplug_ds.runtime.hang_report import (REPORT, TRIGGER, CallRecord, RankDump, Segment, build_report, headline,
                                          one_line, rank_file, read_dumps, write_dump)
from mplug_ds.runtime.launch_env import WorldInfo

EXIT_HANG = 4  # a rank's exit status after a hang report
AUTO_MIN_S = 120.0  # the automatic deadline is never shorter
AUTO_FACTOR = 20.0  # ... and otherwise this many times the slowest interval between progress reports
LONG_FRACTION = 0.9  # first step and checkpoints: this share of run.collective_timeout_s
SEGMENTS = 64  # parts of the run remembered (to label the recent collectives)

_ACTIVE: "HangWatchdog | None" = None


def beat(**where: Any) -> None:
    """Progress inside the current part of the run (``batch="3/20"``); nothing without a running watchdog."""
    watchdog = _ACTIVE
    if watchdog is not None:
        watchdog.beat(**where)


def phase(kind: str, step: int, long: bool = False) -> None:
    """A new part of the run (``"train"`` step ``step``, ``"evaluation"`` after step ``step`` …); ``long`` gives
    it the long deadline (start-up; a session's first step warms up; a checkpoint save waits on the slowest
    writer)."""
    watchdog = _ACTIVE
    if watchdog is not None:
        watchdog.phase(kind, step, long)


def label(kind: str, step: int) -> str:
    """``"step 3"`` for training, ``"evaluation at step 4"`` for the rest."""
    return f"step {step}" if kind == "train" else f"{kind} at step {step}"


class HangWatchdog:
    """This rank's watchdog; ``start()`` it, report progress, ``stop()`` it when the run ends.

    Creating one is a collective: rank 0 moves a previous run's ``RUN/hang`` aside and every rank learns this
    session's token, which marks the files of this run.
    """

    def __init__(self, run_dir: Path, world: WorldInfo, timeout_s: float, long_timeout_s: float,
                 data_position: Callable[[], Any] | None = None) -> None:
        self.run_dir, self.world = Path(run_dir), world
        self.hang_dir = self.run_dir / "hang"
        self.timeout_s, self.long_timeout_s = timeout_s, max(long_timeout_s, timeout_s)
        self.data_position = data_position
        self.session = _agree_session(self.hang_dir, world)
        self.poll_s = min(1.0, max(0.1, (timeout_s or AUTO_MIN_S) / 10))
        self.grace_s = max(2.0, 5 * self.poll_s)  # others see the trigger within poll_s
        self._segments: deque[Segment] = deque(maxlen=SEGMENTS)
        self._label, self._where = "start-up", {}
        self._last = time.monotonic()
        self._slowest = 0.0
        self._long = False
        self._measure = False
        self._done = threading.Event()
        self._reporting = threading.Lock()
        self._reported = False

    # ------------------------------------------------------------------ progress (training thread)
    def beat(self, **where: Any) -> None:
        """Progress; ``where`` describes the position inside the current part of the run."""
        now = time.monotonic()
        if self._measure:
            self._slowest = max(self._slowest, now - self._last)
        self._last = now
        self._measure = not self._long
        self._where = where

    def phase(self, kind: str, step: int, long: bool = False) -> None:
        """Start a part of the run (``long``: with the long deadline); see the module function ``phase``."""
        self._segments.append(Segment(label(kind, step), kind, collectives.issued(), collectives.digest()))
        self._label, self._long = label(kind, step), long
        self.beat()

    def deadline(self) -> float:
        """Seconds without progress after which this rank stops the job."""
        if self._long:
            return self.long_timeout_s
        if self.timeout_s > 0:
            return self.timeout_s
        return min(self.long_timeout_s, max(AUTO_MIN_S, AUTO_FACTOR * self._slowest))

    # ------------------------------------------------------------------ thread
    def start(self) -> "HangWatchdog":
        """Start the thread; from now on a failure of this rank also writes its file (when ranks > 1)."""
        global _ACTIVE
        _ACTIVE = self
        if not faulthandler.is_enabled():  # a native crash (a backend abort) still prints the Python stacks
            try:
                faulthandler.enable(all_threads=True)
            except (AttributeError, ValueError, OSError):  # stderr without a file descriptor (captured)
                pass
        if self.world.world_size > 1:
            failure.report_failures_with(self.report_failure)
        self._last = time.monotonic()
        threading.Thread(target=self._watch, name="hang-watchdog", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop watching (a failure after this still writes its file)."""
        global _ACTIVE
        self._done.set()
        if _ACTIVE is self:
            _ACTIVE = None

    def _watch(self) -> None:
        trigger = self.hang_dir / TRIGGER
        while not self._done.wait(self.poll_s):
            deadline = self.deadline()
            if time.monotonic() - self._last > deadline:
                self._stop_job("hang", f"no progress for more than {deadline:.0f} s ({self._deadline_source()})")
            elif trigger.exists():
                note = _read_trigger(trigger)
                if note.get("session") == self.session and note.get("rank") != self.world.rank:
                    self._stop_job("notified", f"rank {note.get('rank')} stopped first ({note.get('reason')})")

    def _deadline_source(self) -> str:
        if self._long:
            return f"{LONG_FRACTION:g} × run.collective_timeout_s during {self._label}"
        if self.timeout_s > 0:
            return "run.hang_timeout_s"
        return f"automatic: {AUTO_FACTOR:g} × the slowest progress interval {self._slowest:.2f} s, at least " \
               f"{AUTO_MIN_S:g} s"

    def _stop_job(self, cause: str, reason: str) -> None:
        """Write this rank's file (and the trigger), merge if this rank should, exit ``EXIT_HANG``."""
        self._report(cause, reason)
        failure.hard_exit(EXIT_HANG)

    # ------------------------------------------------------------------ failure (main thread)
    def report_failure(self, err: BaseException) -> None:
        """This rank raised: write its file and the trigger and merge like a hang (the caller then exits 1)."""
        try:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher stops the others meanwhile: finish first
        except ValueError:  # not the main thread
            pass
        error = f"{type(err).__name__}: {err}".strip()
        self._report("failure", f"raised {one_line(error)[:1000]}", error=error,
                     trace="".join(traceback.format_exception(err)))

    # ------------------------------------------------------------------ the report
    def _report(self, cause: str, reason: str, error: str | None = None, trace: str | None = None) -> None:
        with self._reporting:
            if self._reported:
                return
            self._reported = True
            try:
                self.hang_dir.mkdir(parents=True, exist_ok=True)
                if cause != "notified":
                    atomic_write_text(self.hang_dir / TRIGGER, json.dumps(
                        {"session": self.session, "rank": self.world.rank, "reason": reason, "time": time.time()}))
                dump = self._dump(cause, reason, error)
                path = rank_file(self.hang_dir, self.world.rank)
                write_dump(path, dump, self._details(dump, trace))
                print(f"rank {self.world.rank}: stopping: {reason}; its state is in {path}", file=sys.stderr,
                      flush=True)
                self._merge_if_mine()
            except Exception as err:  # noqa: BLE001 - the report must never hide why the rank stopped
                print(f"rank {self.world.rank}: could not write the hang report ({type(err).__name__}: {err})",
                      file=sys.stderr, flush=True)

    def _dump(self, cause: str, reason: str, error: str | None) -> RankDump:
        now = time.monotonic()
        segments = list(self._segments)
        failed = collectives.failed()
        return RankDump(
            session=self.session, rank=self.world.rank, world_size=self.world.world_size,
            host=socket.gethostname(), pid=os.getpid(), time=time.time(), cause=cause, reason=reason,
            position=", ".join([self._label, *(f"{k} {v}" for k, v in self._where.items())]),
            idle_s=now - self._last, issued=collectives.issued(),
            in_flight=[_record(c, segments, now) for c in collectives.in_flight()],
            failed=_record(failed, segments, now) if failed is not None else None, error=error,
            recent=[_record(c, segments, now) for c in collectives.recent()], segments=segments)

    def _details(self, dump: RankDump, trace: str | None) -> str:
        lines = [f"rank {dump.rank} of {dump.world_size}, host {dump.host}, pid {dump.pid}, "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(dump.time))}",
                 f"why: {dump.reason}", f"where: {dump.where()} (last progress {dump.idle_s:.1f} s before)",
                 f"data position: {self._data_position()}",
                 f"collectives entered: {dump.issued}"]
        if trace:
            lines += ["", "the exception:", trace.rstrip()]
        lines += ["", f"the last {len(dump.recent)} collectives, oldest first:"]
        lines += [f"  {c.describe()}" for c in dump.recent]
        lines += ["", "stacks of the other threads (most recent call last):", _all_stacks(), ""]
        return "\n".join(lines)

    def _data_position(self) -> str:
        if self.data_position is None:
            return "n/a"
        try:
            return json.dumps(self.data_position(), default=str)[:4000]
        except Exception as err:  # noqa: BLE001 - read from another thread; a failure here is only reported
            return f"unavailable ({type(err).__name__}: {err})"

    def _merge_if_mine(self) -> None:
        """Rank 0 waits for every rank's file and merges; without rank 0's file the lowest rank with one does."""
        me, world = self.world.rank, self.world.world_size
        if me != 0:
            if rank_file(self.hang_dir, 0).exists():
                return
            time.sleep(self.grace_s)
            present = sorted(int(p.stem[5:]) for p in self.hang_dir.glob("rank_*.txt") if p.stem[5:].isdigit())
            if rank_file(self.hang_dir, 0).exists() or not present or present[0] != me:
                return
        else:
            deadline = time.monotonic() + self.grace_s
            while len(list(self.hang_dir.glob("rank_*.txt"))) < world and time.monotonic() < deadline:
                time.sleep(0.2)
        dumps = read_dumps(self.hang_dir, world, self.session)
        report = self.hang_dir / REPORT
        atomic_write_text(report, build_report(dumps, world, self.run_dir, self.grace_s))
        print(f"rank {me}: hang report: {report}\n  {headline(dumps, world, self.grace_s)}", file=sys.stderr,
              flush=True)


def _agree_session(hang_dir: Path, world: WorldInfo) -> str:
    """Rank 0 moves an earlier run's ``hang`` directory aside and draws a token; every rank receives it."""
    token = [None]
    if world.rank == 0:
        if hang_dir.exists():
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(hang_dir.stat().st_mtime))
            target = hang_dir.with_name(f"hang-{stamp}")
            shutil.rmtree(target, ignore_errors=True)
            hang_dir.rename(target)
        token = [secrets.token_hex(8)]
    if world.world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(token, src=0)
    return token[0]


def _read_trigger(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _record(call: collectives.Call, segments: list[Segment], now: float) -> CallRecord:
    segment = "start-up"
    for seg in segments:
        if seg.seq < call.seq:
            segment = seg.label
    in_flight = call.left is None
    seconds = (now if in_flight else call.left) - call.entered
    return CallRecord(call.seq, call.kind, call.nbytes, collectives.comparable(call), call.part, call.site, segment,
                      seconds, in_flight)


def _all_stacks() -> str:
    """Every thread's stack but the calling one's (it is writing the report)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        out.append(f"thread {names.get(ident, '?')} ({ident}):")
        out += [line.rstrip() for line in traceback.format_stack(frame)]
    return "\n".join(out)
