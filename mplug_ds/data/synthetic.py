"""The ``synthetic`` data option: pre-training batches generated in-process, no files needed.

Images are random pixels; captions are random sequences of real English words from the WordPiece vocabulary
(one token each), split into prefix and target and collated by the shard pipeline's own ``collate_caption``, so a
synthetic batch has exactly the layout and padding of a training batch. Every caption is ``max_text_len`` tokens
long (``[CLS]`` and ``[SEP]`` included): the longest a training caption can be, so a benchmark at
``--text-len 30`` measures 30 tokens per caption. Batch ``i`` of
rank ``r`` depends only on ``(seed, r, i)``, so the stream's position is a single integer and resuming is
exact. Used for throughput benchmarks and for engine tests that do not need real data; its held-out
"retrieval" pairs are random, so their recall is chance level (it exercises the evaluation path only).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterator

import torch

from mplug_ds.data.batch import CaptionBatch, RetrievalSet
from mplug_ds.data.collate import collate_caption
from mplug_ds.data.tokenizer import get_tokenizer

WORD_ID_RANGE = (2000, 8000)  # frequent whole words in the bert-base-uncased vocabulary
PREFIX_FRACTION = 0.5  # share of caption words given to the decoder as prefix


@lru_cache(maxsize=1)
def _word_list() -> tuple[str, ...]:
    vocab = get_tokenizer().convert_ids_to_tokens(list(range(*WORD_ID_RANGE)))
    return tuple(w for w in vocab if w.isalpha() and w.isascii() and len(w) > 2)


class SyntheticPretrainBatches:
    """An endless, resumable stream of pre-training batches (``image``, ``text_*``, ``prefix_*``, ``target_*``)."""

    def __init__(self, batch_size: int, image_size: int, max_text_len: int, seed: int, rank: int) -> None:
        self.batch_size = batch_size
        self.image_size = image_size
        self.max_text_len = max_text_len
        self.seed = seed
        self.rank = rank
        self.next_index = 0

    def __iter__(self) -> Iterator[CaptionBatch]:
        while True:
            batch = self.batch(self.next_index)
            self.next_index += 1
            yield batch

    def batch(self, index: int) -> CaptionBatch:
        """Batch number ``index`` of this rank (pure function of seed, rank and index)."""
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_033 + index) % 2**62)
        words = _word_list()
        image = torch.rand(self.batch_size, 3, self.image_size, self.image_size, generator=gen) * 2 - 1
        items = []
        for row in range(self.batch_size):
            n = self.max_text_len - 2  # words, each one token
            caption = [words[i] for i in torch.randint(len(words), (n,), generator=gen).tolist()]
            cut = max(1, min(n - 1, round(n * PREFIX_FRACTION)))
            items.append({"key": f"synthetic-{self.rank}-{index}-{row}", "image": image[row],
                          "text": " ".join(caption), "prefix": " ".join(caption[:cut]),
                          "target": " ".join(caption[cut:]) + " [SEP]"})  # as collate.split_prefix writes it
        batch = collate_caption(items, self.max_text_len)
        del batch["keys"]
        return batch

    def retrieval_set(self, num_pairs: int) -> RetrievalSet:
        """Held-out image–caption pairs (a rank id no training stream uses), one caption per image."""
        held_out = SyntheticPretrainBatches(num_pairs, self.image_size, self.max_text_len, self.seed, rank=-1)
        batch = held_out.batch(0)
        return RetrievalSet(batch["image"], batch["text_ids"], batch["text_mask"], torch.arange(num_pairs))

    def state_dict(self) -> dict[str, Any]:
        """The stream position."""
        return {"next_index": self.next_index, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by ``state_dict``."""
        self.next_index = int(state["next_index"])

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Continue from positions saved by another number of ranks: past the furthest of them, so no rank sees a
        batch of its own stream twice."""
        self.next_index = max(int(state["next_index"]) for state in states)
