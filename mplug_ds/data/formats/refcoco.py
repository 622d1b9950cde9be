"""RefCOCO / RefCOCO+ / RefCOCOg in the refer-toolkit layout: ``refs(<split_by>).p`` + ``instances.json``
(dataset_formats.md §6.1). One grounding sample per expression: ``texts=[sent]``, ``boxes=[xyxy]``.

``--ann`` takes either the two files, or the refer ``data`` folder together with ``--dataset`` (refcoco |
refcoco+ | refcocog) and ``--split-by`` (unc | google | umd), which locate ``data/<dataset>/refs(<split_by>).p``.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Iterator

from mplug_ds.data.formats.coco import coco_image_candidates
from mplug_ds.data.formats.common import (
    AnnotationError,
    MalformedRow,
    ReaderArgs,
    Skip,
    first_existing,
    load_json,
    need,
    safe_key,
    xywh_to_xyxy,
)
from mplug_ds.data.sample import Sample


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that builds only plain data (dict/list/str/numbers): refuses every class or function."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: refs files hold plain data only")


def load_refs(path: Path) -> list[Any]:
    """Load a refer-toolkit pickle (Python 2 pickles too) without executing any code from it."""
    for encoding in ("ASCII", "latin1"):
        try:
            with open(path, "rb") as f:
                refs = _PlainDataUnpickler(f, encoding=encoding).load()
            break
        except UnicodeDecodeError:
            continue
        except OSError as err:
            raise AnnotationError(path, f"{type(err).__name__}: {err}", "check the --ann path") from None
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise AnnotationError(path, f"not a refs pickle ({err})",
                                  "pass the refer toolkit's refs(<split>).p") from None
    else:
        raise AnnotationError(path, "undecodable strings in the pickle", "pass the refer toolkit's refs(<split>).p")
    if not isinstance(refs, list):
        raise AnnotationError(path, f"holds a {type(refs).__name__}, expected a list of refs",
                              "pass the refer toolkit's refs(<split>).p")
    return refs


def _locate(args: ReaderArgs) -> tuple[Path, Path]:
    """(refs pickle, instances.json) from explicit files or a refer data folder + --dataset/--split-by."""
    if len(args.ann) == 1 and args.ann[0].is_dir():
        if not args.dataset or not args.split_by:
            raise AnnotationError(args.ann[0], "a folder needs --dataset and --split-by",
                                  "add e.g. --dataset refcoco+ --split-by unc, or pass the two files")
        folder = args.ann[0] / args.dataset
        if not folder.is_dir():
            folder = args.ann[0]
        return folder / f"refs({args.split_by}).p", folder / "instances.json"
    pickles = [p for p in args.ann if p.suffix in (".p", ".pkl", ".pickle")]
    jsons = [p for p in args.ann if p.suffix == ".json"]
    if len(pickles) != 1 or len(jsons) != 1:
        raise AnnotationError(", ".join(map(str, args.ann)), "expected one refs(*).p and one instances.json",
                              "pass both files, or the refer data folder with --dataset and --split-by")
    return pickles[0], jsons[0]


def read_refcoco(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """Expressions in ref order; the box is the referred instance's ``bbox`` (xywh → xyxy)."""
    refs_path, instances_path = _locate(args)
    refs = load_refs(refs_path)
    instances = load_json(instances_path, dict)
    for name in ("images", "annotations"):
        if not isinstance(instances.get(name), list):
            raise AnnotationError(instances_path, f"no '{name}' list", "pass the refer toolkit's instances.json")
    images = {row.get("id"): row for row in instances["images"] if isinstance(row, dict)}
    boxes = {row.get("id"): row.get("bbox") for row in instances["annotations"] if isinstance(row, dict)}
    dataset = args.dataset or refs_path.parent.name
    split_by = args.split_by or refs_path.stem.partition("(")[2].rstrip(")") or None
    for index, ref in enumerate(refs):
        try:
            ref_id = need(ref, "ref_id", int)
            ann_id = need(ref, "ann_id", int)
            image_id = need(ref, "image_id", int)
            if ann_id not in boxes:
                raise MalformedRow(f"ann_id {ann_id} is not in {instances_path.name}")
            if image_id not in images:
                raise MalformedRow(f"image_id {image_id} is not in {instances_path.name}")
            box = xywh_to_xyxy(boxes[ann_id], f"annotations[id={ann_id}].bbox")
            image = first_existing(args.image_root(), coco_image_candidates(need(images[image_id], "file_name", str)))
            sentences = need(ref, "sentences", list)
        except MalformedRow as err:
            yield Skip(str(refs_path), f"refs[{index}]", f"malformed row: {err}")
            continue
        for number, sentence in enumerate(sentences):
            sent_id = sentence.get("sent_id", number) if isinstance(sentence, dict) else number
            key = safe_key(dataset, split_by, f"r{ref_id}", f"s{sent_id}")
            try:
                text = need(sentence, "sent", str)
            except MalformedRow as err:
                yield Skip(str(refs_path), key, f"malformed sentence: {err}")
                continue
            yield Sample(key=key, task="grounding", image=image, texts=[text], boxes=[list(box)],
                         image_id=str(image_id), split=ref.get("split"),
                         extra={"ref_id": ref_id, "ann_id": ann_id, "sent_id": sent_id,
                                "category_id": ref.get("category_id")})
