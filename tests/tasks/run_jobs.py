"""Run several ``launch/finetune.py`` command lines one after another in one process per rank (tests only).

    python tests/tasks/run_jobs.py JOBS.json            # one rank
    python tests/ranks.py --num_ranks 2 --master_port P tests/tasks/run_jobs.py JOBS.json

``JOBS.json`` is a list of ``[name, argv]``. Each job is ``mplug_ds.tasks.cli.main(argv)``, exactly what
``launch/finetune.py`` runs, so a test pays for starting Python, torch and the process group once for many
evaluations. Rank 0 prints ``=== job NAME ===`` before each job's output; the first non-zero status ends the run.
"""
from __future__ import annotations

import json
import os
import sys

from mplug_ds.runtime.failure import hard_exit
from mplug_ds.tasks.cli import main

MARK = "=== job {} ==="


def run_jobs(path: str) -> int:
    with open(path) as f:
        jobs = json.load(f)
    for name, argv in jobs:
        if os.environ.get("RANK", "0") == "0":
            print(MARK.format(name), flush=True)
        code = main(argv)
        if code:
            return code
    return 0


if __name__ == "__main__":
    hard_exit(run_jobs(sys.argv[1]))
