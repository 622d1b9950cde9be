"""X-VLM / TiMix region files (``vg_object.json``, ``vg_region.json``, ``coco_object.json``; dataset_formats.md §1.7).

Each file is a JSON array whose items are objects or JSON-encoded strings of objects. Rows naming the same image
(across all ``--ann`` files) are merged into one region sample. An image-level ``caption`` becomes a region covering
the whole image; each ``elems[*]`` caption (str | list | ``{"en": str}``) becomes one (text, box) pair, with the
first attribute, when present, in front (``"black stove"``).
"""
from __future__ import annotations

import json
from typing import Any, Iterator

from mplug_ds.data.formats.common import (
    FULL_IMAGE_BOX,
    MalformedRow,
    ReaderArgs,
    Skip,
    load_json,
    need,
    safe_key,
    text_list,
    xywh_to_xyxy,
)
from mplug_ds.data.sample import Sample


def read_xvlm_regions(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """Merge region rows per image path and yield one region sample per image, in first-seen order."""
    merged: dict[str, Sample] = {}
    for path in args.ann:
        for index, item in enumerate(load_json(path, list)):
            try:
                row = json.loads(item) if isinstance(item, str) else item
                image = need(row, "image", str)
                texts, boxes = _pairs(row)
            except (MalformedRow, json.JSONDecodeError) as err:
                yield Skip(str(path), f"[{index}]", f"malformed row: {err}")
                continue
            sample = merged.get(image)
            if sample is None:
                sample = merged[image] = Sample(key=safe_key("xvlm", image.rsplit(".", 1)[0]), task="region",
                                                image=str(args.image_root() / image),
                                                image_id=image.rsplit("/", 1)[-1].rsplit(".", 1)[0])
            sample.texts += texts
            sample.boxes += boxes
    yield from merged.values()


def _pairs(row: dict[str, Any]) -> tuple[list[str], list[list[float]]]:
    texts: list[str] = []
    boxes: list[list[float]] = []
    if row.get("caption") is not None:
        for text in text_list(row["caption"], "caption"):
            texts.append(text)
            boxes.append(list(FULL_IMAGE_BOX))
    for number, elem in enumerate(need(row, "elems", list)):
        where = f"elems[{number}]"
        box = xywh_to_xyxy(need(elem, "bb", list), f"{where}.bb")
        attributes = elem.get("attributes")
        prefix = text_list(attributes, f"{where}.attributes")[:1] if attributes else []
        for text in text_list(need(elem, "caption", (str, list, dict)), f"{where}.caption"):
            texts.append(" ".join([*prefix, text]))
            boxes.append(list(box))
    return texts, boxes
