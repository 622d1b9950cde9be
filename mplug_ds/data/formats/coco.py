"""COCO caption readers: the official ``captions_*.json`` and Karpathy-split ``dataset_*.json`` files.

One caption sample per image, all its captions kept (dataset_formats.md §2.1, §2.2, §1.3).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from mplug_ds.data.formats.common import (
    AnnotationError,
    MalformedRow,
    ReaderArgs,
    Skip,
    ann_name,
    first_existing,
    load_json,
    need,
    rows_to_samples,
    safe_key,
)
from mplug_ds.data.sample import Sample

_COCO_FILE = re.compile(r"COCO_([A-Za-z]+\d{4})_\d+")


def coco_image_candidates(file_name: str) -> list[str]:
    """Where a COCO file name may live under an image root: as given, or in its ``train2014``-style folder."""
    found = _COCO_FILE.match(Path(file_name).name)
    candidates = [file_name]
    if found:
        candidates.append(f"{found.group(1)}/{Path(file_name).name}")
    return candidates


def read_coco_captions(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """Official ``captions_{train,val}{2014,2017}.json``: images joined to their captions by ``image_id``.

    The split is taken from the file name (``captions_train2014.json`` → ``train2014``).
    """
    for path in args.ann:
        data = load_json(path, dict)
        for name in ("images", "annotations"):
            if not isinstance(data.get(name), list):
                raise AnnotationError(path, f"no '{name}' list", "pass a COCO captions_*.json file")
        split = ann_name(path).removeprefix("captions_") or None
        captions: dict[Any, list[str]] = {}
        for index, ann in enumerate(data["annotations"]):
            try:
                captions.setdefault(need(ann, "image_id", (int, str)), []).append(need(ann, "caption", str))
            except MalformedRow as err:
                yield Skip(str(path), f"annotations[{index}]", f"malformed row: {err}")

        def convert(image: Any) -> Sample:
            image_id = need(image, "id", (int, str))
            file_name = need(image, "file_name", str)
            texts = captions.get(image_id)
            if not texts:
                raise MalformedRow(f"image {image_id} has no captions")
            return Sample(key=safe_key("coco", _padded(image_id)), task="caption",
                          image=first_existing(args.image_root(), coco_image_candidates(file_name)),
                          texts=[t.strip() for t in texts], image_id=str(image_id), split=split,
                          extra={"filename": Path(file_name).name})

        rows = ((f"images[{i}]", image) for i, image in enumerate(data["images"]))
        yield from rows_to_samples(path, rows, convert)


def read_coco_karpathy(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """Karpathy ``dataset_{coco,flickr30k,flickr8k}.json`` (a dict with ``images``) or mPLUG's array of the
    same image entries. Image path = ``images/filepath/filename`` (``filepath`` is absent for Flickr)."""
    for path in args.ann:
        data = load_json(path, (dict, list))
        if isinstance(data, dict):
            if not isinstance(data.get("images"), list):
                raise AnnotationError(path, "no 'images' list", "pass a Karpathy dataset_*.json file")
            entries, dataset = data["images"], str(data.get("dataset", "coco"))
        else:
            entries, dataset = data, "coco"

        def convert(entry: Any) -> Sample:
            filename = need(entry, "filename", str)
            sentences = need(entry, "sentences", list)
            texts = [need(s, "raw", str).strip() for s in sentences]
            filepath = entry.get("filepath") or ""
            image_id = entry.get("cocoid", Path(filename).stem)
            extra: dict[str, Any] = {"filename": filename}
            if isinstance(entry.get("object_label"), str):
                extra["object_label"] = entry["object_label"]
            return Sample(key=safe_key(dataset, _padded(image_id)), task="caption",
                          image=str(args.image_root() / filepath / filename), texts=texts,
                          image_id=str(image_id), split=entry.get("split"), extra=extra)

        rows = ((f"images[{i}]", entry) for i, entry in enumerate(entries))
        yield from rows_to_samples(path, rows, convert)


def _padded(image_id: Any) -> str:
    return f"{image_id:012d}" if isinstance(image_id, int) else str(image_id)

