"""Write the procedural demo dataset (mplug_ds/data/demo.py) in the real annotation formats.

  python tools/make_demo_data.py --out demo_data [--seed 0] [--num-images 800] [--image-size 256]
Prints the make_shards.py command for each format afterwards.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from mplug_ds.data.demo import generate_demo, split_sizes


def main(argv: list[str] | None = None) -> int:
    """Generate the demo; return the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed → same files)")
    parser.add_argument("--num-images", type=int, default=800, help="images in all splits (1/8 val, 1/8 test)")
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels")
    args = parser.parse_args(argv)
    try:
        sizes = split_sizes(args.num_images)
    except ValueError as err:
        parser.error(str(err))
    if args.image_size < 48:
        parser.error("--image-size must be at least 48 pixels so the shapes stay visible")
    start = time.monotonic()
    layout = generate_demo(args.out, seed=args.seed, num_images=args.num_images, image_size=args.image_size)
    print(f"wrote {args.num_images} images ({sizes['train']} train / {sizes['val']} val / {sizes['test']} test) "
          f"to {layout.root} in {time.monotonic() - start:.1f} s; to shard them:")
    for name, spec in layout.shard_inputs.items():
        command = ["python", "tools/make_shards.py", "--format", name, "--ann", *map(str, spec["ann"]),
                   "--images", str(spec["images"]), *spec["flags"], "--out", str(args.out / "shards" / name)]
        print("  " + shlex.join(command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
