"""SNLI-VE (dataset_formats.md §7, §1.5). One visual-entailment sample per hypothesis.

Accepts the official JSON-lines ``snli_ve_{train,dev,test}.jsonl`` (image ``flickr30k-images/<Flickr30K_ID>.jpg``,
hypothesis ``sentence2``, ``gold_label``) and ALBEF/mPLUG arrays of ``{"image": id, "sentence", "label"}``.
Labels: 0 contradiction, 1 neutral, 2 entailment; rows with ``gold_label`` "-" (no consensus) are reported.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from mplug_ds.data.formats.common import (
    MalformedRow,
    ReaderArgs,
    Skip,
    ann_name,
    first_existing,
    is_json_array,
    iter_json_lines,
    load_json,
    need,
    rows_to_samples,
    safe_key,
)
from mplug_ds.data.sample import Sample

LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}


def _label(value: Any) -> int:
    if value not in LABELS:
        raise MalformedRow(f"label {value!r} is not one of {', '.join(LABELS)}")
    return LABELS[value]


def _image(root: Path, image_id: str) -> str:
    return first_existing(root, [f"flickr30k-images/{image_id}.jpg", f"{image_id}.jpg",
                                 f"flickr30k_images/{image_id}.jpg"])


def read_snli_ve(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """Hypothesis + premise image + label per row; the split comes from the file name (``snli_ve_dev`` → dev)."""
    root = args.image_root()
    for path in args.ann:
        split = ann_name(path).removeprefix("snli_ve_")
        if is_json_array(path):
            rows = ((f"[{i}]", (i, row)) for i, row in enumerate(load_json(path, list)))
            yield from rows_to_samples(path, rows, lambda item: _albef_row(item[1], item[0], root, split))
        else:
            rows = ((f"line {n}", row) for n, row in iter_json_lines(path))
            yield from rows_to_samples(path, rows, lambda row: _official_row(row, root, split))


def _official_row(row: Any, root: Path, split: str) -> Sample:
    image_id = need(row, "Flickr30K_ID", str)
    pair_id = need(row, "pairID", str)
    return Sample(key=safe_key("ve", pair_id), task="ve", image=_image(root, image_id),
                  texts=[need(row, "sentence2", str)], label=_label(need(row, "gold_label", str)),
                  image_id=image_id, split=split,
                  extra={"pair_id": pair_id, "premise": row.get("sentence1")})


def _albef_row(row: Any, index: int, root: Path, split: str) -> Sample:
    image_id = str(need(row, "image", (str, int)))
    return Sample(key=safe_key("ve", split, index), task="ve", image=_image(root, image_id),
                  texts=[need(row, "sentence", str)], label=_label(need(row, "label", str)),
                  image_id=image_id, split=split)
