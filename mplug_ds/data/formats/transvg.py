"""TransVG / ReSC preprocessed grounding index files ``<dataset>_<split>.pth`` (mPLUG grounding;
dataset_formats.md §6.3). One grounding sample per tuple (= per expression).

The dataset (unc, unc+, gref, gref_umd, referit, flickr) comes from ``--dataset`` or the file name and decides the
tuple shape and box convention: flickr ``(img, xyxy, phrase)``; others ``(img, _, box, phrase, _)`` (4-tuples
accepted), where unc/unc+/gref/gref_umd boxes are xywh truncated to int and referit boxes are already xyxy.
Images are looked up under ``--images`` directly and in the ``ln_data`` sub-folders TransVG uses.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Iterator

from mplug_ds.data.formats.common import (
    AnnotationError,
    MalformedRow,
    ReaderArgs,
    Skip,
    first_existing,
    need,
    number_list,
    safe_key,
)
from mplug_ds.data.sample import Sample

_XYWH_DATASETS = ("unc", "unc+", "gref", "gref_umd")
_KNOWN = (*_XYWH_DATASETS, "referit", "flickr")
_FOLDERS = ("", "train2014", "other/images/mscoco/images/train2014", "referit/images", "Flickr30k/flickr30k_images")


def _dataset_and_split(path: Path, dataset: str | None) -> tuple[str, str]:
    stem = path.stem
    for name in sorted(_KNOWN, key=len, reverse=True):
        if stem.startswith(name + "_"):
            return dataset or name, stem[len(name) + 1:]
    if dataset in _KNOWN:
        return dataset, stem
    raise AnnotationError(path, f"cannot tell the dataset from the file name '{path.name}'",
                          f"pass --dataset (one of {', '.join(_KNOWN)})")


def _load(path: Path) -> list[Any]:
    import torch

    try:
        items = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AnnotationError(path, "file not found", "check the --ann path") from None
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise AnnotationError(path, f"not a torch-saved list of plain tuples ({err})",
                              "pass the TransVG <dataset>_<split>.pth index file") from None
    if not isinstance(items, (list, tuple)):
        raise AnnotationError(path, f"holds a {type(items).__name__}, expected a list of tuples",
                              "pass the TransVG <dataset>_<split>.pth index file")
    return list(items)


def read_transvg(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """Expressions in file order; boxes converted to xyxy."""
    for path in args.ann:
        dataset, split = _dataset_and_split(path, args.dataset)
        for index, item in enumerate(_load(path)):
            key = safe_key(dataset, split, f"{index:07d}")
            try:
                image_file, box, phrase = _unpack(item, dataset)
            except MalformedRow as err:
                yield Skip(str(path), f"[{index}]", f"malformed row: {err}")
                continue
            image = first_existing(args.image_root(), [Path(folder) / image_file for folder in _FOLDERS])
            yield Sample(key=key, task="grounding", image=image, texts=[phrase.lower()], boxes=[box],
                         image_id=Path(image_file).stem, split=split, extra={"dataset": dataset, "index": index})


def _unpack(item: Any, dataset: str) -> tuple[str, list[float], str]:
    if not isinstance(item, (list, tuple)):
        raise MalformedRow(f"expected a tuple, got {type(item).__name__}")
    if dataset == "flickr":
        if len(item) != 3:
            raise MalformedRow(f"flickr rows are (image, box, phrase), got {len(item)} elements")
        image_file, box, phrase = item
    else:
        if len(item) not in (4, 5):
            raise MalformedRow(f"expected (image, seg, box, phrase[, parse]), got {len(item)} elements")
        image_file, box, phrase = item[0], item[2], item[3]
    row = {"image": image_file, "phrase": phrase}
    need(row, "image", str)
    need(row, "phrase", str)
    numbers = number_list(box, 4, "box")
    if dataset in _XYWH_DATASETS:
        x, y, w, h = (int(v) for v in numbers)
        numbers = [x, y, x + w, y + h]
    return image_file, [float(v) for v in numbers], phrase
