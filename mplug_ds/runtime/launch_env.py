"""The process's place in the job, read from whichever launcher started it (deepspeed, torchrun, srun, python)."""
from __future__ import annotations

import errno
import logging
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


class PortInUseError(RuntimeError):
    """The rendezvous port (``MASTER_PORT``) is held by another process on this machine."""


def check_rendezvous_port(world: WorldInfo) -> None:
    """Fail at once when rank 0 cannot listen on ``MASTER_PORT`` (another job holds it).

    Rank 0 hosts the rendezvous store on that port; without this check a second job on a busy port fails only
    after its ranks have started (or its other ranks wait on the first job's store). Under torchrun the agent
    already holds the port for the ranks, and a process already in a process group holds it itself: nothing is
    checked there.
    """
    import torch.distributed as dist

    if world.rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or dist.is_initialized():
        return
    port = int(os.environ.get("MASTER_PORT", "0"))
    if not port:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left in TIME_WAIT is free to use
        try:
            sock.bind(("", port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
            raise PortInUseError(
                f"the rendezvous port MASTER_PORT={port} is already in use on this machine (another job?); "
                f"choose a free one: deepspeed --master_port <port> ... (torchrun: --master_port or "
                f"--rdzv_endpoint; srun / plain python: export MASTER_PORT=<port>)") from None


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


def init_distributed(collective_timeout_s: float) -> None:
    """Start this rank's process group the one way every entry point does: the collective recorder first (so
    DeepSpeed's backend binds the recorded functions), DeepSpeed's CPU shared-memory op skipped, then
    ``deepspeed.init_distributed`` with ``run.collective_timeout_s``. A second call does nothing."""
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from mplug_ds.runtime import collectives

    collectives.install()
    skip_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               timeout=timedelta(seconds=collective_timeout_s))


def skip_cpu_shm_comm() -> None:
    """On a machine without CUDA, keep DeepSpeed from building and mapping its shared-memory all-reduce op.

    DeepSpeed uses that op only for its inference all-reduce (tensor-parallel serving); training collectives go
    through gloo either way. Without this every rank JIT-compiles it (about a minute of compiler time on a fresh
    machine, and again whenever torch's extension build decides the cached one is stale) and maps a 66 MB
    ``/dev/shm`` segment that DeepSpeed never unlinks. DeepSpeed keeps its table of usable ops in one dict that it
    reads here (``deepspeed.ops.__compatible_ops__``), so marking the op unusable there is enough.
    """
    import torch

    if torch.cuda.is_available():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def limit_cpu_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads on a CPU-only machine (``run.cpu_threads``; 0 or ``OMP_NUM_THREADS`` set:
    torch's default). Spin-waiting BLAS threads slow down many-fold when other work shares the cores."""
    import torch

    if threads and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)


EXIT_PORT_IN_USE = 3  # a launch script's exit status when its rendezvous port is taken


def start_rank(local_rank: int | None) -> WorldInfo:
    """What every launch script does first: honour the deepspeed launcher's ``--local_rank``, fill the world
    (``prepare_world_env``), log at INFO on rank 0 only, and check the rendezvous port (``PortInUseError``)."""
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    world = prepare_world_env()
    logging.basicConfig(level=logging.INFO if world.rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    check_rendezvous_port(world)
    return world
