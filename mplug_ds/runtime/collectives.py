"""Every collective this process issues, recorded: kind, bytes, call site, sequence number, and the part of the
step it belongs to.

``install()`` wraps the ``torch.distributed`` collectives once per process, before the process group starts
(``runtime.launch_env.init_distributed`` calls it first, so DeepSpeed's communication backend binds the wrapped
functions). DeepSpeed's ZeRO traffic and our own calls (loss agreement, contrastive all-gathers, the teacher) are seen
alike. A collective called inside another (``all_gather_object`` → ``all_gather``) counts once, as the outer one.
The cost is one Python frame walk and a few appends per collective.

Two readers:

* accounting: ``take_counts()`` returns calls and bytes per (part, kind) since the last take (the trainer takes
  them once per optimizer step). ``with part("teacher_update"): ...`` names the part of everything issued inside;
  outside any ``part`` a collective issued from DeepSpeed's code is ``"zero"`` and any other ``"other"``.
* the hang watchdog: ``recent()`` (the last collectives entered, with the time each one left),
  ``in_flight()`` (the ones entered and not yet left, per thread), ``failed()`` (the last one that raised) and
  ``digest()``, a running hash of every (kind, size) so far: equal on all ranks while their sequences agree.
* the divergence check: ``observe(callback)`` hands every new ``Call`` to ``callback`` on the calling thread.

``nbytes`` is the size of the collective's largest buffer: the reduced tensor (all-reduce), the gathered output
(all-gather), the input before scattering (reduce-scatter), the broadcast tensor; 0 for barriers and pickled objects.
What one rank sends follows from it and the world size (``traffic_bytes``). ``comparable(call)`` is what must be
equal on every rank: the size, except for collectives whose buffers differ by rank by design (gather and scatter
lists exist on the root only); point-to-point calls differ by rank and are left out of ``digest()``.
"""
from __future__ import annotations

import functools
import sys
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

# The public collectives of torch.distributed (and the private ones DeepSpeed falls back to).
KINDS = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_single",
         "_all_gather_base", "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
         "_reduce_scatter_base", "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather",
         "gather_into_tensor", "gather_single", "scatter", "barrier", "monitored_barrier",
         "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list", "send", "recv",
         "isend", "irecv", "batch_isend_irecv")
RECENT = 256  # collectives kept for the watchdog's report
POINT_TO_POINT = frozenset({"send", "recv", "isend", "irecv", "batch_isend_irecv"})
ROOTED = frozenset({"gather", "scatter", "gather_object", "scatter_object_list"})  # lists on the root only
_MASK = (1 << 63) - 1
_FNV_PRIME = 0x100000001B3
_SKIPPED_DIRS = (str(Path(torch.__file__).parent), str(Path(__file__).resolve()))
_DEEPSPEED = "/deepspeed/"


@dataclass
class Call:
    """One collective: its place in this process's sequence, what it moved and where it was issued."""

    seq: int
    kind: str
    nbytes: int
    part: str
    site: str  # "path/to/file.py:LINE in function" of the innermost caller outside torch
    entered: float  # time.monotonic()
    left: float | None = None  # None while in flight

    def describe(self) -> str:
        state = "in flight" if self.left is None else f"{(self.left - self.entered) * 1e3:.1f} ms"
        return f"#{self.seq} {self.kind} {self.nbytes} B [{self.part}] at {self.site} ({state})"


class _Recorder:
    def __init__(self) -> None:
        self.seq = 0
        self.recent: deque[Call] = deque(maxlen=RECENT)
        self.counts: Counter[tuple[str, str]] = Counter()
        self.bytes: Counter[tuple[str, str]] = Counter()
        self.local = threading.local()  # .depth, .parts, .current
        self.flight: dict[int, Call] = {}
        self.lock = threading.Lock()
        self.digest = 0
        self.failed: Call | None = None
        self.observer: Callable[[Call], None] | None = None

    def parts(self) -> list[str]:
        if not hasattr(self.local, "parts"):
            self.local.parts = []
        return self.local.parts


_RECORDER = _Recorder()
_installed = False


def install() -> None:
    """Wrap the ``torch.distributed`` collectives (idempotent); call before the process group starts."""
    global _installed
    if _installed:
        return
    c10d = dist.distributed_c10d
    for kind in KINDS:
        original = getattr(c10d, kind, None) or getattr(dist, kind, None)
        if original is None:
            continue
        wrapped = _wrap(kind, original)
        for module in (dist, c10d):
            if getattr(module, kind, None) is original:
                setattr(module, kind, wrapped)
    _installed = True


def installed() -> bool:
    """True once ``install()`` ran in this process."""
    return _installed


@contextmanager
def part(name: str) -> Iterator[None]:
    """Count the collectives issued inside (on this thread) under ``name``; the innermost ``part`` wins."""
    parts = _RECORDER.parts()
    parts.append(name)
    try:
        yield
    finally:
        parts.pop()


def take_counts() -> dict[str, dict[str, dict[str, int]]]:
    """``{part: {kind: {"calls": n, "bytes": b}}}`` since the last take, and reset them."""
    r = _RECORDER
    with r.lock:
        counts, sizes = r.counts, r.bytes
        r.counts, r.bytes = Counter(), Counter()
    out: dict[str, dict[str, dict[str, int]]] = {}
    for (name, kind), calls in sorted(counts.items()):
        out.setdefault(name, {})[kind] = {"calls": calls, "bytes": sizes[(name, kind)]}
    return out


def recent() -> list[Call]:
    """The last ``RECENT`` collectives this process entered, oldest first (``left`` is None while in flight)."""
    return list(_RECORDER.recent)


def in_flight() -> list[Call]:
    """Collectives entered and not yet left, one per thread at most."""
    return list(_RECORDER.flight.values())


def failed() -> Call | None:
    """The last collective that raised (a peer gone, a backend time-out), or None."""
    return _RECORDER.failed


def digest() -> int:
    """A running 63-bit hash of the (kind, ``comparable`` size) of every collective entered so far, point-to-point
    calls left out: ranks whose sequences agree hold the same value."""
    return _RECORDER.digest


def comparable(call: Call) -> int:
    """The part of a call's size that every rank shares (0 for gather/scatter, whose lists only the root holds)."""
    return 0 if call.kind in ROOTED else call.nbytes


def observe(callback: Callable[[Call], None] | None) -> None:
    """Hand every collective entered from now on to ``callback`` (on the calling thread); None stops it."""
    _RECORDER.observer = callback


def issued() -> int:
    """How many collectives this process has entered so far (the sequence number of the last one)."""
    return _RECORDER.seq


def traffic_bytes(kind: str, nbytes: int, world_size: int) -> float:
    """Bytes one rank sends for a collective of ``nbytes`` with ring algorithms (the usual bus-bandwidth model):
    all-reduce 2(W−1)/W, all-gather and reduce-scatter (W−1)/W, broadcast and others (W−1)/W of the buffer."""
    if world_size <= 1:
        return 0.0
    factor = (world_size - 1) / world_size
    return nbytes * (2 * factor if kind.startswith("all_reduce") else factor)


def _wrap(kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    code = (KINDS.index(kind) + 1) << 48
    hashed = kind not in POINT_TO_POINT
    rooted = kind in ROOTED

    @functools.wraps(fn)
    def collective(*args: Any, **kwargs: Any) -> Any:
        r = _RECORDER
        depth = getattr(r.local, "depth", 0)
        if depth:
            return fn(*args, **kwargs)
        site, from_deepspeed = _call_site()
        parts = r.parts()
        name = parts[-1] if parts else ("zero" if from_deepspeed else "other")
        size = 0 if kind.endswith("_object") or kind.endswith("object_list") else _largest_buffer(args, kwargs)
        with r.lock:
            r.seq += 1
            call = Call(r.seq, kind, size, name, site, time.monotonic())
            r.counts[(name, kind)] += 1
            r.bytes[(name, kind)] += size
            if hashed:
                r.digest = ((r.digest ^ (code | (0 if rooted else size))) * _FNV_PRIME) & _MASK
        r.recent.append(call)
        thread = threading.get_ident()
        r.flight[thread] = call
        if r.observer is not None:
            r.observer(call)
        r.local.depth = 1
        try:
            return fn(*args, **kwargs)
        except BaseException:
            r.failed = call
            raise
        finally:
            r.local.depth = 0
            call.left = time.monotonic()
            r.flight.pop(thread, None)

    collective.__wrapped_collective__ = True  # type: ignore[attr-defined]
    return collective


def _largest_buffer(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    best = 0
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            best = max(best, value.numel() * value.element_size())
        elif isinstance(value, (list, tuple)) and value and all(isinstance(t, torch.Tensor) for t in value):
            best = max(best, sum(t.numel() * t.element_size() for t in value))
    return best


def _call_site() -> tuple[str, bool]:
    """The innermost caller outside torch and this module, and whether DeepSpeed's code issued the collective."""
    frame = sys._getframe(2)
    from_deepspeed = False
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_SKIPPED_DIRS):
            if _DEEPSPEED + "comm/" in path:  # DeepSpeed's comm layer: look further out
                from_deepspeed = True
                frame = frame.f_back
                continue
            from_deepspeed = from_deepspeed or _DEEPSPEED in path
            return f"{_short(path)}:{frame.f_lineno} in {frame.f_code.co_name}", from_deepspeed
        frame = frame.f_back
    return "?", from_deepspeed


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/mplug_ds/", "/tests/", "/tools/"):
        if marker in path:
            head = "" if marker == "/site-packages/" else marker.strip("/") + "/"
            return head + path.split(marker, 1)[1]
    return path
