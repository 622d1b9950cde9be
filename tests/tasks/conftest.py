"""Fixtures of the task tests."""
import os

import pytest

WORLD_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def single_process_env(monkeypatch):
    """``launch/finetune.py``'s ``main`` called in this process: a one-process job, its world env removed after."""
    for key in WORLD_KEYS:
        monkeypatch.delenv(key, raising=False)
    yield
    for key in WORLD_KEYS:
        os.environ.pop(key, None)
