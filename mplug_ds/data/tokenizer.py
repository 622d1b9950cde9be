"""The bert-base-uncased WordPiece tokenizer (30522 tokens), shipped with the package and loaded offline."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from transformers import BertTokenizerFast

TOKENIZER_DIR = Path(__file__).parent / "assets" / "bert-base-uncased"

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103
VOCAB_SIZE = 30522
FIRST_WORD_ID = 999  # ids below are [PAD], [unusedK], [UNK], [CLS], [SEP], [MASK]; 999 is '!'


def unused_token_id(k: int) -> int:
    """Vocabulary id of ``[unusedK]`` in the standard uncased layout (checked against the shipped vocab)."""
    return k + 1 if k <= 98 else k + 5


@lru_cache(maxsize=None)
def get_tokenizer(path: str | None = None) -> BertTokenizerFast:
    """A fast lower-casing WordPiece tokenizer from a directory holding ``vocab.txt``.

    ``path`` defaults to the bert-base-uncased vocabulary shipped inside the package (no download).
    """
    return BertTokenizerFast.from_pretrained(str(path or TOKENIZER_DIR))
