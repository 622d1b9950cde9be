"""ALBEF/mPLUG caption JSONs: pre-training lists and retrieval train/eval files (dataset_formats.md §1.1, §1.2).

Every file is a JSON array of ``{"image": path, "caption": str | list[str], "image_id"?: any}``; several files are
concatenated. Rows naming the same image are merged so each image becomes one caption sample with all its captions.
"""
from __future__ import annotations

from typing import Iterator

from mplug_ds.data.formats.common import MalformedRow, ReaderArgs, Skip, load_json, need, safe_key, text_list
from mplug_ds.data.sample import Sample


def read_albef(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """One caption sample per distinct ``image`` path, in first-seen order."""
    merged: dict[str, Sample] = {}
    for path in args.ann:
        for index, row in enumerate(load_json(path, list)):
            try:
                image = need(row, "image", str)
                texts = text_list(need(row, "caption", (str, list)), "caption")
            except MalformedRow as err:
                yield Skip(str(path), f"[{index}]", f"malformed row: {err}")
                continue
            sample = merged.get(image)
            if sample is None:
                stem = image.rsplit(".", 1)[0]
                image_id = row.get("image_id", stem.rsplit("/", 1)[-1])
                sample = merged[image] = Sample(key=safe_key("albef", stem), task="caption",
                                                image=str(args.image_root() / image), image_id=str(image_id))
            sample.texts += [t.strip() for t in texts]
    yield from merged.values()
