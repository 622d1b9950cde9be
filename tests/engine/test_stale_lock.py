"""A torch-extension build lock left by a killed run is named at start-up (else the next run hangs silently)."""
from __future__ import annotations

import logging
import os
import time

from mplug_ds.runtime.launch_env import STALE_LOCK_SECONDS, stale_extension_locks, start_rank


def test_start_names_a_stale_op_build_lock_and_how_to_remove_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    stale, fresh = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", tmp_path / "py311_cpu" / "other" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - STALE_LOCK_SECONDS - 60
    os.utime(stale, (old, old))
    assert stale_extension_locks() == [stale]

    with caplog.at_level(logging.WARNING):
        start_rank(None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"rm {stale}" in warnings[0] and "11 min old" in warnings[0]
