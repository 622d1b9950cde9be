"""Helpers shared by model/objective tests: small real-tokenizer batches."""
import torch

from mplug_ds.data.batch import CaptionBatch
from mplug_ds.data.collate import collate_caption

CAPTIONS = ["a red circle on the left", "two blue squares at the top", "a green triangle in the center",
            "three yellow circles on the right"]


def pretrain_batch(batch_size=4, image_size=64, seed=0, text_len=12) -> CaptionBatch:
    """A pre-training batch collated by the loader's own ``collate_caption``, captions split into prefix / target
    at a word."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    items = []
    for i in range(batch_size):
        words = CAPTIONS[i % len(CAPTIONS)].split()
        cut = 1 + i % (len(words) - 1)
        items.append({"key": str(i), "image": images[i], "text": " ".join(words), "prefix": " ".join(words[:cut]),
                      "target": " ".join(words[cut:]) + " [SEP]"})
    batch = collate_caption(items, text_len)
    del batch["keys"]
    return batch
