"""Start N ranks of a Python script on this machine with the environment torchrun leaves them (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), for tests whose subject is the run, not the launcher.

    python tests/ranks.py --num_ranks 2 --master_port PORT SCRIPT [ARGS ...]

The ``deepspeed`` launcher starts two Python processes of its own that import DeepSpeed before the first rank
starts (about 5 s a run on the 2-core test machine); this one imports nothing but the standard library. Like the
launchers, it ends with the first non-zero rank status after SIGKILLing the other ranks, and forwards SIGTERM to
them. Tests of the launcher's own behaviour (tests/engine/test_failure_exit.py, test_port_in_use.py, the hostfile
test, the demo test) run the real ``deepspeed``.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_ranks", type=int, default=2)
    parser.add_argument("--master_port", required=True)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    procs = []
    for rank in range(args.num_ranks):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.num_ranks),
                   LOCAL_WORLD_SIZE=str(args.num_ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.master_port))
        procs.append(subprocess.Popen([sys.executable, "-u", args.script, *args.args], env=env))
    signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs if p.poll() is None])
    while True:
        codes = [p.poll() for p in procs]
        failed = next((c for c in codes if c not in (None, 0)), None)
        if failed is not None:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            return failed
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
