"""Visual Genome readers: region phrases (``region_descriptions.json``) and objects (``objects.json`` /
``attributes.json``), each with an optional ``image_data.json`` (dataset_formats.md §3).

One region sample per image: ``texts[i]`` describes ``boxes[i]`` (xyxy pixels). Which annotation file is which is
recognised from its content, so the files can be passed to ``--ann`` in any order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from mplug_ds.data.formats.common import (
    AnnotationError,
    MalformedRow,
    ReaderArgs,
    Skip,
    first_existing,
    load_json,
    need,
    number_list,
    safe_key,
)
from mplug_ds.data.sample import Sample

_IMAGE_FOLDERS = ("VG_100K", "VG_100K_2", "image", "images", "")


def _kind(path: Path, data: list[Any]) -> str:
    first = next((row for row in data if isinstance(row, dict)), None)
    if first is None:
        return "empty"
    for key, kind in (("regions", "regions"), ("objects", "objects"), ("url", "image_data")):
        if key in first:
            return kind
    raise AnnotationError(path, f"unrecognised Visual Genome file (first entry has keys {sorted(first)})",
                          "pass region_descriptions.json, objects.json, attributes.json and/or image_data.json")


def _load_vg(args: ReaderArgs) -> tuple[dict[str, list[tuple[Path, list[Any]]]], dict[int, str]]:
    """Annotation files grouped by kind, plus image id → folder (``VG_100K`` …) from ``image_data.json``."""
    files: dict[str, list[tuple[Path, list[Any]]]] = {}
    folders: dict[int, str] = {}
    for path in args.ann:
        data = load_json(path, list)
        kind = _kind(path, data)
        files.setdefault(kind, []).append((path, data))
        if kind == "image_data":
            for row in data:
                if isinstance(row, dict) and isinstance(row.get("url"), str):
                    parts = Path(urlparse(row["url"]).path).parts
                    if len(parts) >= 2:
                        folders[row.get("image_id", row.get("id"))] = parts[-2]
    return files, folders


def _image_id(row: Any) -> int:
    """Top-level image id: ``id`` (region_descriptions v1.2) or ``image_id`` (objects, later versions)."""
    if isinstance(row, dict) and "image_id" in row:
        return need(row, "image_id", int)
    return need(row, "id", int)


def _image_path(root: Path, image_id: int, folders: dict[int, str]) -> str:
    preferred = [folders[image_id]] if image_id in folders else []
    return first_existing(root, [Path(d) / f"{image_id}.jpg" for d in [*preferred, *_IMAGE_FOLDERS]])


def _box(item: dict[str, Any], wide: str, high: str, where: str) -> list[float]:
    x, y, w, h = number_list([item.get("x"), item.get("y"), item.get(wide), item.get(high)], 4,
                             f"{where} x/y/{wide}/{high}")
    return [x, y, x + w, y + h]


def read_vg_regions(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """``region_descriptions.json``: one sample per image, one (phrase, box) pair per region."""
    files, folders = _load_vg(args)
    if not files.get("regions"):
        raise AnnotationError(args.ann[0], "no region_descriptions.json among the --ann files",
                              "pass region_descriptions.json (and optionally image_data.json)")
    for path, data in files["regions"]:
        for index, row in enumerate(data):
            try:
                image_id = _image_id(row)
                regions = need(row, "regions", list)
            except MalformedRow as err:
                yield Skip(str(path), f"[{index}]", f"malformed row: {err}")
                continue
            texts, boxes = [], []
            for r_index, region in enumerate(regions):
                try:
                    phrase = need(region, "phrase", str)
                    box = _box(region, "width", "height", "region")
                except MalformedRow as err:
                    yield Skip(str(path), f"vg_{image_id}_r{_item_id(region, 'region_id', r_index)}",
                               f"malformed region: {err}")
                    continue
                texts.append(phrase.strip())
                boxes.append(box)
            yield Sample(key=safe_key("vg", image_id), task="region",
                         image=_image_path(args.image_root(), image_id, folders),
                         texts=texts, boxes=boxes, image_id=str(image_id))


def read_vg_objects(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """``objects.json`` and/or ``attributes.json``: one pair per object, text = first attribute + first name."""
    files, folders = _load_vg(args)
    sources = files.get("objects", [])
    if not sources:
        raise AnnotationError(args.ann[0], "no objects.json or attributes.json among the --ann files",
                              "pass objects.json and/or attributes.json (and optionally image_data.json)")
    attributes = _attributes_by_object(sources)
    with_attributes = [(p, d) for p, d in sources if _has_attributes(d)]
    plain = [(p, d) for p, d in sources if not _has_attributes(d)]
    for path, data in plain or with_attributes:
        for index, row in enumerate(data):
            try:
                image_id = _image_id(row)
                objects = need(row, "objects", list)
            except MalformedRow as err:
                yield Skip(str(path), f"[{index}]", f"malformed row: {err}")
                continue
            texts, boxes = [], []
            for o_index, obj in enumerate(objects):
                try:
                    names = need(obj, "names", list)
                    if not names or not isinstance(names[0], str):
                        raise MalformedRow("field 'names' must be a non-empty list of strings")
                    wide, high = ("w", "h") if "w" in obj else ("width", "height")
                    box = _box(obj, wide, high, "object")
                except MalformedRow as err:
                    yield Skip(str(path), f"vg_{image_id}_o{_item_id(obj, 'object_id', o_index)}",
                               f"malformed object: {err}")
                    continue
                attrs = attributes.get(obj.get("object_id"), [])
                texts.append(" ".join([*attrs[:1], names[0]]).strip())
                boxes.append(box)
            yield Sample(key=safe_key("vgobj", image_id), task="region",
                         image=_image_path(args.image_root(), image_id, folders),
                         texts=texts, boxes=boxes, image_id=str(image_id))


def _has_attributes(data: list[Any]) -> bool:
    for row in data:
        for obj in row.get("objects", []) if isinstance(row, dict) else []:
            if isinstance(obj, dict) and "attributes" in obj:
                return True
    return False


def _attributes_by_object(sources: list[tuple[Path, list[Any]]]) -> dict[Any, list[str]]:
    found: dict[Any, list[str]] = {}
    for _, data in sources:
        for row in data:
            for obj in row.get("objects", []) if isinstance(row, dict) else []:
                attrs = obj.get("attributes") if isinstance(obj, dict) else None
                if isinstance(attrs, list):
                    found[obj.get("object_id")] = [a.strip() for a in attrs if isinstance(a, str) and a.strip()]
    return found


def _item_id(item: Any, id_field: str, index: int) -> Any:
    return item.get(id_field, index) if isinstance(item, dict) else index
