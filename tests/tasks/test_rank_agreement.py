"""Rank-dependent control flow that reaches a collective, on 2 gloo ranks: the ranks decide together (an evaluation
set too small for the ranks fails on every rank alike), and the divergence check names a rank's extra module call."""
import os
import re
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mplug_ds.distributed import range_over_ranks
from mplug_ds.eval.distributed import lockstep_batches
from mplug_ds.runtime import collectives
from mplug_ds.runtime.divergence import CollectiveDivergence, DivergenceCheck
from mplug_ds.runtime.launch_env import free_port
from tests.processes import timeout

pytestmark = pytest.mark.slow  # multi-process runs


def _outcome(fn):
    try:
        return repr(fn())
    except (ValueError, CollectiveDivergence) as err:
        return f"{type(err).__name__}: {err}"


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    collectives.install()
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    results = {"range": _outcome(lambda: range_over_ranks([rank, 5, -rank]))}
    items = ["a", "b", "c"] if rank == 0 else []  # 3 evaluation samples for 2 ranks of batch 1: rank 1 has none
    results["lockstep_without_filler"] = _outcome(lambda: list(lockstep_batches(items, 2, items[0] if items else None)))
    results["lockstep"] = _outcome(lambda: [real for _, real in lockstep_batches(["a"] * (2 - rank), 1, "a")])

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    check = DivergenceCheck(model, every_steps=2)
    for step in (1, 2, 3, 4):
        model(torch.zeros(1, 4))
        if rank == 1 and step == 3:
            model[1](torch.zeros(1, 4))  # one extra module call on one rank
        dist.all_reduce(torch.zeros(1))
        results[f"check after step {step}"] = _outcome(lambda: check.end_step(step))
    check.close()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ranks_agree_before_rank_dependent_collectives_and_the_check_names_the_extra_call(tmp_path):
    # spawn, not fork: a forked rank would inherit the process group an in-process test of this session started
    ranks = mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + timeout(120)
        while not ranks.join(timeout=1):
            assert time.monotonic() < deadline, "the two ranks did not finish in time"
    finally:
        for process in ranks.processes:
            process.kill()
            process.join()
    r0, r1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2))
    assert r0["range"] == r1["range"] == repr(([0, 5, -1], [1, 5, 0]))
    for result in (r0, r1):  # the same error on both ranks, before any batch
        assert result["lockstep_without_filler"] == (
            "ValueError: a rank has only 0 of the 2 evaluation batches and no sample to run filler batches with: "
            "the evaluation set needs at least as many samples as ranks (2)")
    assert r0["lockstep"] == "[True, True]" and r1["lockstep"] == "[True, False]"  # rank 1 pads with a filler
    for result in (r0, r1):
        assert result["check after step 2"] == "None"  # the same calls so far
        # Entry 0 is the step-2 check's own all-reduce, then step 3: Sequential, Linear, LayerNorm, the extra call.
        assert re.fullmatch(
            r"CollectiveDivergence: rank 1 differs from rank 0 in its collectives and module calls since the check "
            r"after step 2 \(run\.check_collectives, checked after step 4\): at entry 4 rank 1 has module call 1 "
            r"\(step 3\), rank 0 has collective all_reduce 4 B at tests/tasks/test_rank_agreement\.py:\d+ in _worker "
            r"\(step 3\)", result["check after step 4"]), result["check after step 4"]
