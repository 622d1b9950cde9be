"""How specific the demo world's captions are: the share of training captions that are, word for word, also a
caption of another training image (such captions make "hard negatives" that are in fact true)."""
from __future__ import annotations

import argparse
import random
from collections import defaultdict

from mplug_ds.data.demo import make_scene, split_sizes
from mplug_ds.data.demo_shards import DEMO_IMAGE_SIZE, DEMO_IMAGES, DEMO_SEED


def shared_caption_share(num_images: int = DEMO_IMAGES, seed: int = DEMO_SEED) -> tuple[float, int]:
    """(share of training captions that another training image also has, number of training captions)."""
    rng = random.Random(seed)
    owners: dict[str, set[int]] = defaultdict(set)
    captions: list[tuple[int, str]] = []
    image_id = 0
    for split, n in split_sizes(num_images).items():
        for _ in range(n):
            image_id += 1
            scene = make_scene(rng, image_id, split, DEMO_IMAGE_SIZE)
            if split != "train":
                continue
            for caption in scene.captions:
                key = caption.lower().rstrip(".")
                owners[key].add(image_id)
                captions.append((image_id, key))
    shared = sum(len(owners[key]) > 1 for _, key in captions)
    return shared / len(captions), len(captions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=DEMO_IMAGES)
    parser.add_argument("--seed", type=int, default=DEMO_SEED)
    args = parser.parse_args()
    share, n = shared_caption_share(args.images, args.seed)
    print(f"{share:.1%} of {n} training captions are word for word a caption of another training image")


if __name__ == "__main__":
    main()
