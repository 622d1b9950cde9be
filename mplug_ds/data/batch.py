"""The batch types shared by every producer (collate, synthetic data, tests) and consumer (objectives, engine).

Texts are tokenized ``[CLS] … [SEP]``, truncated to the configured length (``data.max_text_len``,
``DataConfig.max_len``) and padded with ``[PAD]`` to the longest text of the batch: text-side work follows the
captions' real length (a typical caption is half the configured length), not the configured maximum.
"""
import dataclasses

import torch
from typing_extensions import NotRequired, TypedDict

Batch = dict[str, torch.Tensor]  # the tensors of any task's batch, as the engine moves them to the device


class CaptionBatch(TypedDict):
    """A pre-training batch of ``B`` image–caption pairs; text fields are ``(B, L)`` long tensors.

    ``text_*``: the caption; ``prefix_*``: its first words (the decoder's prompt, possibly empty);
    ``target_*``: the remaining words followed by ``[SEP]`` (what the prefix-LM decoder must produce).
    """

    image: torch.Tensor  # (B, 3, R, R) float, normalised
    text_ids: torch.Tensor
    text_mask: torch.Tensor  # 1 for real tokens, 0 for padding
    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    keys: NotRequired[list[str]]  # sample keys (shard loader only; not tensors, dropped before the model)


CAPTION_TENSORS = tuple(k for k in CaptionBatch.__annotations__ if k != "keys")


@dataclasses.dataclass
class RetrievalSet:
    """Held-out pairs: ``images`` (N,3,R,R), ``text_ids``/``text_mask`` (M,L), and ``text_to_image`` (M,)."""

    images: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    text_to_image: torch.Tensor
