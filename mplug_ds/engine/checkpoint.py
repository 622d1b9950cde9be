"""DeepSpeed checkpoints with the run's client state, a completeness marker, keep-last-N and auto-resume.

Layout of ``<output_dir>/checkpoints``::

    step_00000500/                    one DeepSpeed tag (model/optimizer states of every rank)
        rank_00000_state.pt           per rank: RNG states and the data loader position
        momentum_teacher.pt           the fp32 EMA teacher (identical on every rank; written by rank 0)
        complete.json                 written last: step, epoch, samples seen, world size
    latest                            the newest complete tag (DeepSpeed's convention, so zero_to_fp32 works)
    best.json                         the best tag by the recipe's metric (kept by keep-last-N pruning)

A tag without ``complete.json`` (a run killed while saving) is never resumed from. Every file the engine
writes itself goes to a temporary name first and is then renamed.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mplug_ds.distributed import get_rank, get_world_size, is_distributed
from mplug_ds.runtime import safe_load
from mplug_ds.runtime.atomic import atomic_torch_save, atomic_write_text

TAG_PATTERN = re.compile(r"^step_(\d{8})$")
COMPLETE = "complete.json"
TEACHER_FILE = "momentum_teacher.pt"
LATEST = "latest"
BEST = "best.json"


@dataclass
class TrainState:
    """Where the run is: optimizer steps taken, epoch, samples consumed (global) and the skipped batches."""

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    skipped_batches: int = 0


def tag_for(step: int) -> str:
    """The DeepSpeed tag of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:08d}"


def rank_state_file(tag_dir: Path, rank: int) -> Path:
    """The per-rank client state file inside a tag directory."""
    return tag_dir / f"rank_{rank:05d}_state.pt"


def complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Every complete checkpoint under ``directory`` as ``(step, tag_dir)``, oldest first."""
    found = []
    if directory.is_dir():
        for child in directory.iterdir():
            match = TAG_PATTERN.match(child.name)
            if match and (child / COMPLETE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_complete(directory: Path) -> Path | None:
    """The newest complete checkpoint tag directory, or ``None``."""
    found = complete_checkpoints(directory)
    return found[-1][1] if found else None


def resolve_resume(spec: str | None, checkpoint_dir: Path) -> Path | None:
    """The tag directory to resume from.

    ``spec``: ``None``/``"none"`` (fresh start), ``"auto"`` (newest complete checkpoint in ``checkpoint_dir``,
    fresh start when there is none), or a path to a tag directory, a checkpoints directory or a run's output
    directory.
    """
    if spec is None or spec == "none":
        return None
    if spec == "auto":
        return latest_complete(checkpoint_dir)
    path = Path(spec).expanduser()
    if (path / COMPLETE).is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        newest = latest_complete(candidate)
        if newest is not None:
            return newest
    if TAG_PATTERN.match(path.name) and path.is_dir():
        raise FileNotFoundError(f"--resume {spec}: checkpoint has no {COMPLETE} (it was not finished being "
                                "written); resume from an earlier one or use --resume auto")
    raise FileNotFoundError(f"--resume {spec}: no complete checkpoint found there (expected a step_XXXXXXXX "
                            "directory with complete.json, or a directory holding them)")


def read_marker(tag_dir: Path) -> dict[str, Any]:
    """The ``complete.json`` of a checkpoint."""
    return json.loads((tag_dir / COMPLETE).read_text())


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


class CheckpointManager:
    """Saves and restores complete training checkpoints; keeps the newest ``keep_last``."""

    def __init__(self, directory: Path, keep_last: int, trust_pickles: bool = False) -> None:
        self.directory = directory
        self.keep_last = keep_last
        self.trust_pickles = trust_pickles

    def save(self, engine: Any, state: TrainState, rank_state: dict[str, Any],
             teacher_state: dict[str, torch.Tensor] | None) -> Path:
        """Write one checkpoint (a collective: every rank calls it at the same step). Returns its directory."""
        rank, tag = get_rank(), tag_for(state.step)
        tag_dir = self.directory / tag
        if rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # leftovers of a save that was interrupted before completing
                shutil.rmtree(tag_dir)
        _barrier()
        engine.save_checkpoint(str(self.directory), tag=tag, client_state={"train_state": dataclasses.asdict(state)},
                               save_latest=False)
        tag_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(rank_state, rank_state_file(tag_dir, rank))
        if rank == 0 and teacher_state is not None:
            atomic_torch_save(teacher_state, tag_dir / TEACHER_FILE)
        _barrier()
        if rank == 0:
            marker = {**dataclasses.asdict(state), "world_size": get_world_size(), "tag": tag,
                      "has_teacher": teacher_state is not None, "time": time.time()}
            atomic_write_text(tag_dir / COMPLETE, json.dumps(marker, indent=1))
            atomic_write_text(self.directory / LATEST, tag)
            self.prune()
        _barrier()
        return tag_dir

    def best(self) -> dict[str, Any] | None:
        """The best checkpoint recorded by ``mark_best`` (``tag``, ``step``, ``metric``, ``value``), or ``None``."""
        path = self.directory / BEST
        return json.loads(path.read_text()) if path.is_file() else None

    def mark_best(self, tag_dir: Path, metric: str, value: float) -> None:
        """Record ``tag_dir`` as the best checkpoint by ``metric`` (rank 0); ``prune`` never deletes it."""
        record = {"tag": tag_dir.name, "step": read_marker(tag_dir)["step"], "metric": metric, "value": value}
        atomic_write_text(self.directory / BEST, json.dumps(record, indent=1))

    def prune(self) -> None:
        """Delete complete checkpoints beyond the newest ``keep_last`` (except the best) and unfinished ones older
        than the newest."""
        complete = complete_checkpoints(self.directory)
        best = self.best()
        for _, tag_dir in complete[:-self.keep_last]:
            if best is None or tag_dir.name != best["tag"]:
                shutil.rmtree(tag_dir, ignore_errors=True)
        if complete:
            newest = complete[-1][0]
            for child in self.directory.iterdir():
                match = TAG_PATTERN.match(child.name)
                if match and int(match.group(1)) < newest and not (child / COMPLETE).exists():
                    shutil.rmtree(child, ignore_errors=True)

    def load(self, engine: Any, tag_dir: Path
             ) -> tuple[TrainState, dict[str, Any], dict[str, torch.Tensor] | None]:
        """Restore engine states from ``tag_dir``; returns the train state, this rank's state and the teacher.

        Every file is read with the restricted unpickler (``safe_load``) unless ``trust_pickles``.
        """
        marker = read_marker(tag_dir)
        world = get_world_size()
        if marker["world_size"] != world:
            raise RuntimeError(
                f"{tag_dir} was written by {marker['world_size']} ranks but this run has {world}: ZeRO partitions, "
                "RNG states and data positions are per rank, so resume with the same number of ranks, or export "
                "the weights (tools/export_checkpoint.py) and start a new run from them (docs/multi_node.md)")
        trusted = self.trust_pickles
        if not trusted:
            safe_load.check_checkpoint(tag_dir)
        with safe_load.deepspeed_weights_only(trusted):
            loaded, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=True,
                                                    load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {tag_dir}")
        state = TrainState(**client["train_state"])
        rank_state = safe_load.load(rank_state_file(tag_dir, get_rank()), trusted)
        teacher = safe_load.load(tag_dir / TEACHER_FILE, trusted) if marker.get("has_teacher") else None
        return state, rank_state, teacher
