"""Draw a run's training curves: per-objective losses, learning rate and samples/s from its metrics.jsonl.

    python tools/plot_run.py RUN_DIR [--out FILE.png]      # default RUN_DIR/curves.png
Pre-training writes the same picture at the end of every run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mplug_ds.engine.plot import PLOT_FILE, plot_run


def main(argv: list[str] | None = None) -> int:
    """Write the PNG and print its path; return the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run's output directory (run.output_dir)")
    parser.add_argument("--out", type=Path, help=f"PNG to write (default RUN_DIR/{PLOT_FILE})")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.out)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
