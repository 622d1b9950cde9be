"""What each rank writes when the job stops making progress, and the one report merged from those files.

Every rank writes ``RUN/hang/rank_XXXXX.txt``: a first line of JSON (``RankDump``: why it stopped, where it was,
the collectives in flight, the last ``collectives.RECENT`` it entered with the part of the run each belongs to, and
the running digest at the start of each part), then the same for people, with every thread's stack. One rank
reads the first line of every file (one small read per rank) and writes ``RUN/hang/report.txt`` (``build_report``):
the headline names the rank that differs and the first collective where the sequences part, or the ranks that
sent nothing, or the rank that failed first; then the ranks grouped by where they stopped.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mplug_ds.runtime.atomic import atomic_write_text

REPORT = "report.txt"
TRIGGER = "trigger.json"


def one_line(error: str) -> str:
    """An exception's text on one line: its first line, and its last when there are more (a DataLoader worker's
    error carries the original one last)."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return " … ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else "".join(lines)


def rank_file(hang_dir: Path, rank: int) -> Path:
    """Where ``rank`` writes its state."""
    return hang_dir / f"rank_{rank:05d}.txt"


@dataclass
class CallRecord:
    """One collective as a rank recorded it."""

    seq: int
    kind: str
    nbytes: int
    comparable: int  # the size every rank shares (``collectives.comparable``)
    part: str
    site: str
    segment: str  # the part of the run it was issued in: "step 3", "evaluation at step 4", ...
    seconds: float  # how long it took, or has waited so far while in flight
    in_flight: bool = False

    def key(self) -> tuple[str, int, str]:
        """What must be equal on every rank for the same sequence number."""
        return self.kind, self.comparable, self.site

    def what(self) -> str:
        return f"{self.kind} {self.nbytes} B at {self.site}"

    def describe(self, timed: bool = True) -> str:
        """``#seq kind bytes at site [part] (segment, duration)``; ``timed=False`` leaves the duration out."""
        state = f"in flight for {self.seconds:.1f} s" if self.in_flight else f"{self.seconds * 1e3:.1f} ms"
        return f"#{self.seq} {self.what()} [{self.part}] ({self.segment}{', ' + state if timed else ''})"


@dataclass
class Segment:
    """The start of one part of the run on a rank: collectives entered before it and their running digest."""

    label: str  # "step 3", "evaluation at step 4"
    kind: str  # "train", "evaluation", "checkpoint", ...
    seq: int
    digest: int


@dataclass
class RankDump:
    """The machine-readable first line of a rank's file."""

    session: str
    rank: int
    world_size: int
    host: str
    pid: int
    time: float  # wall clock when written
    cause: str  # "hang" (no progress), "failure" (an exception), "notified" (another rank's report)
    reason: str
    position: str  # "step 3, micro_batch 1"
    idle_s: float  # seconds since the last progress
    issued: int  # collectives entered so far
    in_flight: list[CallRecord] = field(default_factory=list)
    failed: CallRecord | None = None  # the collective that raised
    error: str | None = None  # "RuntimeError: ..." for a failure
    recent: list[CallRecord] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> "RankDump":
        raw = json.loads(line)
        raw["in_flight"] = [CallRecord(**c) for c in raw["in_flight"]]
        raw["failed"] = CallRecord(**raw["failed"]) if raw["failed"] else None
        raw["recent"] = [CallRecord(**c) for c in raw["recent"]]
        raw["segments"] = [Segment(**s) for s in raw["segments"]]
        return cls(**raw)

    def calls(self) -> dict[int, CallRecord]:
        return {c.seq: c for c in self.recent}

    def where(self, timed: bool = True) -> str:
        """Where this rank stopped, in one line (``timed=False``: without durations, to group ranks)."""
        if self.in_flight:
            inside = "; ".join(f"in collective {c.describe(timed)}" for c in self.in_flight)
        elif self.failed is not None:
            inside = f"its collective {self.failed.describe(timed)} raised"
        else:
            inside = "not in a collective"
        return f"{self.position}: {inside}"


def write_dump(path: Path, dump: RankDump, details: str) -> None:
    """The rank file: the JSON line, then ``details`` for people (atomic)."""
    atomic_write_text(path, dump.to_json() + "\n" + details)


def read_dump(path: Path) -> RankDump | None:
    """The JSON line of a rank file (only that line is read); None when missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return RankDump.from_json(f.readline())
    except (OSError, ValueError, TypeError, KeyError):
        return None


def read_dumps(hang_dir: Path, world_size: int, session: str) -> dict[int, RankDump]:
    """The rank files of this session (files of an earlier run in the same directory are ignored)."""
    dumps = {}
    for path in hang_dir.glob("rank_*.txt"):
        dump = read_dump(path)
        if dump is not None and dump.session == session and 0 <= dump.rank < world_size:
            dumps[dump.rank] = dump
    return dumps


# ---------------------------------------------------------------------------------------------------------- merge
@dataclass
class Divergence:
    """The first sequence number at which the ranks' collectives differ, and who differs there."""

    seq: int
    by_rank: dict[int, CallRecord | None]  # None: that rank entered no collective #seq
    odd: list[int]  # the ranks that differ from the others (empty when it cannot be told)
    reference: list[int]
    kind: str  # "skipped", "extra" or "differs"
    expected: CallRecord | None  # what the reference ranks entered at ``seq``


def _ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2,5"``."""
    out, ranks = [], sorted(ranks)
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(out)


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + _ranges(ranks)


def find_divergence(dumps: dict[int, RankDump]) -> Divergence | None:
    """The first collective (by sequence number, within the recorded windows) that the ranks entered differently.

    A rank that has not entered that many collectives yet is behind, not different (``None`` in ``by_rank``).
    """
    if len(dumps) < 2:
        return None
    calls = {rank: d.calls() for rank, d in dumps.items()}
    start = max(min(c) if c else dumps[rank].issued + 1 for rank, c in calls.items())
    end = max(d.issued for d in dumps.values())
    for seq in range(start, end + 1):
        at = {rank: c.get(seq) for rank, c in calls.items()}
        if len({call.key() for call in at.values() if call is not None}) > 1:
            return _classify(seq, at, dumps)
    return None


def _classify(seq: int, at: dict[int, CallRecord | None], dumps: dict[int, RankDump]) -> Divergence:
    groups: dict[tuple[str, int, str], list[int]] = {}
    for rank, call in at.items():
        if call is not None:
            groups.setdefault(call.key(), []).append(rank)
    (top, top_n), (_, second_n) = Counter({key: len(ranks) for key, ranks in groups.items()}).most_common(2)
    if top_n > second_n:  # most ranks entered the same call: the others differ
        reference = groups[top]
        odd = sorted(r for ranks in groups.values() for r in ranks if r not in reference)
    else:  # a tie (two ranks): the rank whose part of the run stops repeating its previous one differs
        follows = {rank: _repeats_previous(dumps[rank], seq) for rank, call in at.items() if call is not None}
        odd = sorted(r for r, f in follows.items() if f is False)
        reference = sorted(r for r, f in follows.items() if f is True)
        if not odd or not reference:
            return Divergence(seq, at, [], sorted(follows), "differs", None)
    return Divergence(seq, at, odd, sorted(reference), _skip_or_extra(dumps[odd[0]], dumps[reference[0]], seq),
                      at[reference[0]])


def _segment_of(dump: RankDump, seq: int) -> int | None:
    index = None
    for i, seg in enumerate(dump.segments):
        if seg.seq < seq:
            index = i
    return index


def _pattern(dump: RankDump, seq: int) -> tuple[list[CallRecord], list[CallRecord]] | None:
    """(the calls of the previous part of the same kind, the calls of ``seq``'s part up to ``seq``), when the
    recorded window holds both."""
    i = _segment_of(dump, seq)
    if i is None:
        return None
    seg = dump.segments[i]
    j = next((k for k in range(i - 1, -1, -1) if dump.segments[k].kind == seg.kind), None)
    if j is None:
        return None
    calls = dump.calls()
    prev_start, prev_end = dump.segments[j].seq, dump.segments[j + 1].seq
    if prev_start + 1 < min(calls, default=prev_start + 2):
        return None
    previous = [calls[s] for s in range(prev_start + 1, prev_end + 1) if s in calls]
    current = [calls[s] for s in range(seg.seq + 1, seq + 1) if s in calls]
    return previous, current


def _repeats_previous(dump: RankDump, seq: int) -> bool | None:
    """Whether this rank's calls up to ``seq`` repeat the previous part of the run of the same kind (a training
    step repeats the step before it); None when the window does not hold it."""
    pattern = _pattern(dump, seq)
    if pattern is None:
        return None
    previous, current = pattern
    return len(current) <= len(previous) and all(a.key() == b.key() for a, b in zip(current, previous))


def _skip_or_extra(odd: RankDump, reference: RankDump, seq: int) -> str:
    mine, theirs = odd.calls(), reference.calls()
    if seq + 1 in theirs and seq in mine and mine[seq].key() == theirs[seq + 1].key():
        return "skipped"
    if seq + 1 in mine and seq in theirs and mine[seq + 1].key() == theirs[seq].key():
        return "extra"
    pattern = _pattern(odd, seq)  # stuck right after the difference: compare with its own previous part
    if pattern is not None and seq in mine:
        previous, current = pattern
        i = len(current) - 1
        if i + 1 < len(previous) and current[i].key() == previous[i + 1].key() and seq in theirs and \
                theirs[seq].key() == previous[i].key():
            return "skipped"
    return "differs"


def first_differing_segment(dumps: dict[int, RankDump]) -> str | None:
    """The first part of the run at whose start the ranks' running digests (or collective counts) already
    differed: the sequences parted in the part before it, even beyond the recorded windows."""
    common = None
    for d in dumps.values():
        labels = [s.label for s in d.segments]
        common = labels if common is None else [label for label in common if label in labels]
    for label in common or []:
        starts = {(s.seq, s.digest) for d in dumps.values() for s in d.segments if s.label == label}
        if len(starts) > 1:
            return label
    return None


def _origin_failures(dumps: dict[int, RankDump]) -> list[RankDump]:
    """Ranks that raised outside any collective: the failure the others then saw as a lost peer."""
    return sorted((d for d in dumps.values() if d.cause == "failure" and d.failed is None),
                  key=lambda d: (d.time, d.rank))


def headline(dumps: dict[int, RankDump], world_size: int, grace_s: float) -> str:
    """One sentence: who stopped where, and why the others stopped."""
    missing = [r for r in range(world_size) if r not in dumps]
    origins = _origin_failures(dumps)
    if origins:
        first = origins[0]
        same = [d.rank for d in origins if d.error == first.error]
        who = _ranks(same) if len(same) < len(dumps) else "every rank"
        return f"{who} failed ({first.position}): {one_line(first.error)}"
    divergence = find_divergence(dumps)
    if divergence is not None and divergence.odd:
        return _divergence_sentence(divergence)
    if missing:
        waiting = _waiting_in(dumps)
        return (f"{_ranks(missing)} wrote no report within {grace_s:.0f} s: gone (killed, crashed) or frozen; "
                f"the other ranks stopped {waiting}")
    if divergence is not None:
        calls = "; ".join(f"rank {r}: {'nothing' if c is None else c.what()}" for r, c in divergence.by_rank.items())
        return f"collective #{divergence.seq} differs between the ranks ({calls})"
    behind = _behind(dumps)
    if behind:
        most = max(d.issued for d in dumps.values())
        return (f"{_ranks(behind)} behind: entered {min(dumps[r].issued for r in behind)} collectives while the "
                f"others reached #{most}; {dumps[behind[0]].where()}")
    return "every rank stopped in step with the others; no rank differs in its collectives (see the stacks)"


def _divergence_sentence(d: Divergence) -> str:
    rank = d.odd[0]
    mine = d.by_rank[rank]
    others = _ranks(d.reference)
    segment = (d.expected or mine).segment if (d.expected or mine) else "?"
    if d.kind == "skipped" and d.expected is not None:
        own = f"; its #{d.seq} is {mine.what()}" if mine is not None else ""
        return (f"{_ranks(d.odd)} skipped collective #{d.seq} of {segment}: {d.expected.what()} "
                f"(entered by {others}){own}")
    if d.kind == "extra" and mine is not None:
        return (f"{_ranks(d.odd)} entered an extra collective #{d.seq} in {segment}: {mine.what()} "
                f"({others} entered {d.expected.what() if d.expected else 'nothing'} there)")
    own = mine.what() if mine is not None else "nothing"
    expected = d.expected.what() if d.expected else "nothing"
    return f"{_ranks(d.odd)} differs at collective #{d.seq} of {segment}: {own} where {others} entered {expected}"


def _waiting_in(dumps: dict[int, RankDump]) -> str:
    places = Counter()
    for d in dumps.values():
        if d.in_flight:
            places[f"in collective {d.in_flight[0].describe(timed=False)}"] += 1
        elif d.failed is not None:
            places[f"when their collective {d.failed.describe(timed=False)} raised"] += 1
        else:
            places[f"at {d.position}"] += 1
    most = [place for place, _ in places.most_common(3)]
    return "; ".join(most) + ("; …" if len(places) > 3 else "")


def _behind(dumps: dict[int, RankDump]) -> list[int]:
    most = max(d.issued for d in dumps.values())
    return sorted(r for r, d in dumps.items() if d.issued < most and not d.in_flight)


def build_report(dumps: dict[int, RankDump], world_size: int, run_dir: Path, grace_s: float) -> str:
    """The merged report (``report.txt``): headline, the first difference, the ranks grouped by where they are."""
    lines = [f"hang report of {run_dir} ({world_size} rank{'s' if world_size != 1 else ''}, written "
             f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')})", "", "What happened: " + headline(dumps, world_size, grace_s)]
    missing = [r for r in range(world_size) if r not in dumps]
    if missing:
        lines.append(f"No report from {_ranks(missing)} (a rank killed by a signal writes nothing; a native crash "
                     "prints its Python stacks to that rank's stderr).")
    divergence = find_divergence(dumps)
    if divergence is not None:
        lines += ["", f"First collective where the ranks' sequences differ: #{divergence.seq}"]
        for rank, call in sorted(divergence.by_rank.items()):
            lines.append(f"  rank {rank}: {'none entered' if call is None else call.describe()}")
    segment = first_differing_segment(dumps)
    if segment is not None:
        lines.append(f"The running digests of the collectives already differed when {segment} began.")
    lines += ["", "Why each rank stopped:"]
    reasons: dict[str, list[int]] = {}
    for rank, d in sorted(dumps.items()):
        reasons.setdefault(d.reason, []).append(rank)
    lines += [f"  {_ranks(ranks)}: {reason}" for reason, ranks in reasons.items()]
    lines += ["", "Where each rank stopped:"]
    places: dict[str, list[int]] = {}
    for rank, d in sorted(dumps.items()):
        places.setdefault(d.where(timed=False), []).append(rank)
    for place, ranks in places.items():
        hosts = sorted({dumps[r].host for r in ranks})
        idle = max(dumps[r].idle_s for r in ranks)
        lines.append(f"  {_ranks(ranks)} ({', '.join(hosts[:4])}{', …' if len(hosts) > 4 else ''}): {place} "
                     f"(last progress up to {idle:.1f} s before)")
    lines += ["", f"Each rank's file (its threads' stacks, its last collectives, its data position): "
              f"{run_dir / 'hang'}/rank_XXXXX.txt", ""]
    return "\n".join(lines)
