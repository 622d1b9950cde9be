"""Helpers shared by model/objective tests: small real-tokenizer batches."""
import torch

from mplug_ds.data.tokenizer import get_tokenizer

CAPTIONS = ["a red circle on the left", "two blue squares at the top", "a green triangle in the center",
            "three yellow circles on the right"]


def tokenize(texts, length):
    enc = get_tokenizer()(list(texts), padding="max_length", truncation=True, max_length=length,
                          return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def pretrain_batch(batch_size=4, image_size=64, seed=0):
    """A pre-training batch in the loader's layout, captions split into prefix / target at a word."""
    gen = torch.Generator().manual_seed(seed)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    words = [c.split() for c in captions]
    splits = [1 + i % (len(w) - 1) for i, w in enumerate(words)]
    text_ids, text_mask = tokenize(captions, 12)
    prefix_ids, prefix_mask = tokenize([" ".join(w[:s]) for w, s in zip(words, splits)], 8)
    target_ids, target_mask = tokenize([" ".join(w[s:]) + " [SEP]" for w, s in zip(words, splits)], 10)
    return {"image": torch.randn(batch_size, 3, image_size, image_size, generator=gen),
            "text_ids": text_ids, "text_mask": text_mask, "prefix_ids": prefix_ids, "prefix_mask": prefix_mask,
            "target_ids": target_ids, "target_mask": target_mask}
