"""The process's place in the job, read from whichever launcher started it (deepspeed, torchrun, srun, python)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class WorldInfo:
    """Global rank, local rank and world size of this process."""

    rank: int
    local_rank: int
    world_size: int


def free_port() -> int:
    """An unused TCP port on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_world_env() -> WorldInfo:
    """Fill ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` for ``torch.distributed`` and return them.

    The deepspeed launcher and torchrun set these already. Under ``srun`` without torchrun they are derived
    from ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS`` (``MASTER_ADDR`` must then be exported, see
    docs/multi_node.md). A plain ``python launch/pretrain.py`` becomes a one-process job on a free local port.
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
        env.setdefault("MASTER_PORT", "29500")
    if "RANK" not in env:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("LOCAL_RANK", "0")
    return WorldInfo(rank=int(env["RANK"]), local_rank=int(env["LOCAL_RANK"]), world_size=int(env["WORLD_SIZE"]))
