"""Fixtures of the engine tests."""
import os

import pytest
import torch

from mplug_ds.runtime.launch_env import prepare_world_env


@pytest.fixture(scope="session")
def world():
    """A one-process world (the environment a rank would have), shared by every in-process engine test: DeepSpeed
    keeps its process group for the life of the interpreter. Restored at the end of the session."""
    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    if saved["RANK"] is None:
        for key in saved:
            os.environ.pop(key, None)
    yield prepare_world_env()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
