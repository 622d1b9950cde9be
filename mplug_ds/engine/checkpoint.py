"""DeepSpeed checkpoints with the run's client state, a completeness marker, keep-last-N and auto-resume.

Layout of ``<output_dir>/checkpoints``::

    step_00000500/                    one DeepSpeed tag (model/optimizer states of every rank)
        rank_00000_state.pt           per rank: RNG states and the data loader position
        momentum_teacher.pt           the recipe's replicated extra state, e.g. the fp32 EMA teacher of a one-rank
                                      or stage-0 run (identical on every rank; written by rank 0)
        momentum_teacher_rank_00000.pt  per rank: its share of partitioned extra state (the momentum teacher
                                      partitioned like the ZeRO optimizer), read back on any number of ranks
        complete.json                 written last: step, epoch, samples seen, world size, ZeRO stage, global batch
        universal/                    made on demand: the tag as a DeepSpeed universal checkpoint (any world size)
    latest                            the newest complete tag (DeepSpeed's convention, so zero_to_fp32 works)
    best.json                         the best tag by the recipe's metric (kept by keep-last-N pruning)

A tag without ``complete.json`` (a run killed while saving) is never resumed from. Every file the engine
writes itself goes to a temporary name first and is then renamed.

Resuming on a different number of ranks goes through DeepSpeed's universal checkpoint: rank 0 converts the tag once
(``ds_to_universal``, into ``universal/``), every rank loads its new partition of the weights and optimizer state from
it; RNG states of ranks that existed are restored, new ranks are seeded from (seed, rank, step), and the data
streams re-split their positions (``load_resharded``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
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
UNIVERSAL = "universal"
EXPORT_FILE = "model.safetensors"  # an export's MPLUG weights (mplug_ds.engine.export)
TASK_FILE = "task.safetensors"  # an export's task tensors beside the MPLUG, e.g. a classification head
RUN_CONFIG_FILE = "run_config.yaml"  # an export's copy of the run's config.yaml (task options, text lengths)
RANDOM_INIT_FILE = "random_init.yaml"  # a fine-tuning run's tensors never trained (``keys``), from its start


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


def shard_file(tag_dir: Path, rank: int) -> Path:
    """Rank ``rank``'s share of the recipe's partitioned state (the partitioned momentum teacher)."""
    return tag_dir / f"momentum_teacher_rank_{rank:05d}.pt"


def shard_files(tag_dir: Path) -> list[Path]:
    """Every rank's ``shard_file`` of a checkpoint, by rank (empty when its state was not partitioned)."""
    ranks = read_marker(tag_dir).get("shard_ranks", 0)
    return [shard_file(tag_dir, rank) for rank in range(ranks)]


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


@dataclass(frozen=True)
class CheckpointLayout:
    """How a checkpoint was written: ranks, ZeRO stage and global batch (``None`` when older markers lack it)."""

    world_size: int
    zero_stage: int
    global_batch: int | None


def checkpoint_layout(tag_dir: Path) -> CheckpointLayout:
    """The layout recorded in ``complete.json`` (the ZeRO stage read from the files for older checkpoints)."""
    marker = read_marker(tag_dir)
    stage = marker.get("zero_stage")
    if stage is None:
        stage = 1 if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")) else 0
    return CheckpointLayout(marker["world_size"], stage, marker.get("global_batch"))


def convert_to_universal(tag_dir: Path, trusted: bool = False) -> Path:
    """``tag_dir/universal``: the checkpoint in DeepSpeed's universal format, converted once (``ds_to_universal``).

    The converter unpickles every file fully, so unless ``trusted`` the files are first scanned with the restricted
    unpickler's rules (``safe_load.check_checkpoint``). Written to a temporary directory and renamed when complete.
    """
    out = tag_dir / UNIVERSAL
    if (out / COMPLETE).is_file():
        return out
    if not trusted:
        safe_load.check_checkpoint(tag_dir)
    tmp = tag_dir / f"{UNIVERSAL}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"converting {tag_dir} to a universal checkpoint failed ({' '.join(command)}):\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")
    atomic_write_text(tmp / COMPLETE, json.dumps({"source": tag_dir.name, "time": time.time()}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


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
             teacher_state: dict[str, torch.Tensor] | None, sharded_state: dict[str, Any] | None = None) -> Path:
        """Write one checkpoint (a collective: every rank calls it at the same step). Returns its directory.

        ``teacher_state``: replicated state rank 0 writes; ``sharded_state``: this rank's share of partitioned state
        (every rank writes its own)."""
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
        if sharded_state is not None:
            atomic_torch_save(sharded_state, shard_file(tag_dir, rank))
        _barrier()
        if rank == 0:
            marker = {**dataclasses.asdict(state), "world_size": get_world_size(), "tag": tag,
                      "zero_stage": int(engine.zero_optimization_stage()),
                      "global_batch": int(engine.train_batch_size()),
                      "has_teacher": teacher_state is not None,
                      "shard_ranks": get_world_size() if sharded_state is not None else 0, "time": time.time()}
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
             ) -> tuple[TrainState, dict[str, Any], dict[str, torch.Tensor] | None, list[Path]]:
        """Restore engine states from ``tag_dir``; returns the train state, this rank's state, the replicated extra
        state (the teacher of a replicated run) and every saving rank's ``shard_file`` (empty when none).

        Written by as many ranks as this run has: this rank's state is ``{"rng", "data"}``. Written by another number
        of ranks (the DeepSpeed config must then have ``checkpoint.load_universal``, see ``validate_engine``): the
        engine loads the universal conversion and this rank's state is ``{"rng": its old RNG state or None,
        "data_by_rank": every old rank's data position}``. Every file is read with the restricted unpickler
        (``safe_load``) unless ``trust_pickles``.
        """
        marker = read_marker(tag_dir)
        world, rank = get_world_size(), get_rank()
        resharded = marker["world_size"] != world
        if resharded and not engine.load_universal_checkpoint():
            raise RuntimeError(
                f"{tag_dir} was written by {marker['world_size']} ranks but this run has {world} and its DeepSpeed "
                "config does not load universal checkpoints; resume through the command line (--resume), which "
                "converts it (docs/multi_node.md)")
        trusted = self.trust_pickles
        if not trusted:
            safe_load.check_checkpoint(tag_dir)
        load_dir, tag = tag_dir.parent, tag_dir.name
        if resharded:
            if rank == 0:
                convert_to_universal(tag_dir, trusted)
            _barrier()
            load_dir, tag = tag_dir, UNIVERSAL
            if not trusted:
                safe_load.check_checkpoint(tag_dir / UNIVERSAL)
        with safe_load.deepspeed_weights_only(trusted):
            loaded, client = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True,
                                                    load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {tag_dir}")
        state = TrainState(**client["train_state"])
        if resharded:
            old = [safe_load.load(rank_state_file(tag_dir, r), trusted) for r in range(marker["world_size"])]
            rank_state = {"rng": old[rank]["rng"] if rank < len(old) else None,
                          "data_by_rank": [o["data"] for o in old]}
        else:
            rank_state = safe_load.load(rank_state_file(tag_dir, rank), trusted)
        teacher = safe_load.load(tag_dir / TEACHER_FILE, trusted) if marker.get("has_teacher") else None
        return state, rank_state, teacher, shard_files(tag_dir)
