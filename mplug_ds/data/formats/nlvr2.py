"""NLVR2 (dataset_formats.md §7, §1.5). One sample per sentence: ``images=[left, right]``, label 1 = "True".

Accepts the official JSON-lines files (``train.json``, ``dev.json``, ``test1.json``; images
``images/train/<directory>/<split>-<set>-<pair>-img0.png`` …, ``dev/…``, ``test1/…``) and ALBEF/mPLUG arrays of
``{"images": [left, right], "sentence", "label"}``. Image files may hold JPEG bytes despite ``.png``; the shard
writer decodes by content.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from mplug_ds.data.formats.common import (
    MalformedRow,
    ReaderArgs,
    Skip,
    first_existing,
    is_json_array,
    iter_json_lines,
    load_json,
    need,
    rows_to_samples,
    safe_key,
)
from mplug_ds.data.sample import Sample

LABELS = {"False": 0, "True": 1}


def _label(row: dict[str, Any]) -> int:
    label = need(row, "label", (str, bool))
    label = str(label)
    if label not in LABELS:
        raise MalformedRow(f"field 'label' is {label!r}, expected 'True' or 'False'")
    return LABELS[label]


def read_nlvr2(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """Sentence + image pair + label per row; the split comes from the identifier (official) or file name."""
    root = args.image_root()
    for path in args.ann:
        if is_json_array(path):
            rows = ((f"[{i}]", (i, row)) for i, row in enumerate(load_json(path, list)))
            yield from rows_to_samples(path, rows, lambda item: _albef_row(item[1], item[0], root, path.stem))
        else:
            rows = ((f"line {n}", row) for n, row in iter_json_lines(path))
            yield from rows_to_samples(path, rows, lambda row: _official_row(row, root))


def _official_row(row: Any, root: Path) -> Sample:
    identifier = need(row, "identifier", str)
    parts = identifier.split("-")
    if len(parts) != 4:
        raise MalformedRow(f"identifier {identifier!r} is not <split>-<set>-<pair>-<sentence>")
    split, stem = parts[0], "-".join(parts[:3])
    directory = row.get("directory")
    folders = [f"images/{split}/{directory}", f"{split}/{directory}", f"images/{split}", split, "."]
    images = [first_existing(root, [f"{folder}/{stem}-img{side}.png" for folder in folders]) for side in (0, 1)]
    return Sample(key=safe_key("nlvr2", identifier), task="nlvr2", images=images,
                  texts=[need(row, "sentence", str)], label=_label(row), image_id=stem, split=split,
                  extra={"identifier": identifier})


def _albef_row(row: Any, index: int, root: Path, split: str) -> Sample:
    pair = need(row, "images", list)
    if len(pair) != 2 or not all(isinstance(p, str) for p in pair):
        raise MalformedRow("field 'images' must be a list of two paths")
    stem = Path(pair[0]).name.rsplit("-img", 1)[0]
    return Sample(key=safe_key("nlvr2", split, index), task="nlvr2", images=[str(root / p) for p in pair],
                  texts=[need(row, "sentence", str)], label=_label(row), image_id=stem, split=split)
