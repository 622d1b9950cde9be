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


def release_cpu_comm_segment(rank: int) -> None:
    """Unlink the shared-memory segment DeepSpeed's CPU communication op creates for this rank.

    On CPU, ``deepspeed.init_distributed`` maps a 66 MB ``/dev/shm`` segment per rank, named after the rendezvous
    address and port, and never unlinks it: every run would leave its segments behind in memory. Once every rank
    has mapped every other rank's segment (the barrier), removing the names frees them when the ranks exit.
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass
