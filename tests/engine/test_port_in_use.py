"""Two jobs on one machine and one rendezvous port: the second fails at once, naming the port and the fix."""
import socket
import time

import pytest

from mplug_ds.runtime.launch_env import free_port
from tests.engine.engine_runs import DEEPSPEED, PRETRAIN
from tests.processes import run, started, wait_for

pytestmark = pytest.mark.slow  # two launcher jobs


def _job(port, out, ranks, steps):
    return [DEEPSPEED, "--master_port", str(port), "--num_gpus", str(ranks), PRETRAIN, "--config", "synthetic_tiny",
            f"schedule.total_steps={steps}", "eval.retrieval=false", "logging.progress_bar=false",
            "logging.every_steps=1", f"run.output_dir={out}"]


def _listening(port):
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_second_job_on_a_busy_port_exits_within_seconds_naming_the_port(tmp_path):
    port = free_port()
    with started(_job(port, tmp_path / "first", 1, 10_000)) as first:
        wait_for(lambda: _listening(port), 240, first, "the first job's rendezvous store")
        begin = time.monotonic()
        code, output = run(_job(port, tmp_path / "second", 1, 2), 120)
        took = time.monotonic() - begin
        assert code != 0
        assert f"MASTER_PORT={port} is already in use" in output and "--master_port" in output, output[-3000:]
        assert took < 60, f"the second job took {took:.0f} s to fail"
        assert not (tmp_path / "second" / "metrics.jsonl").exists()
        assert first.poll() is None, "the first job was disturbed"
