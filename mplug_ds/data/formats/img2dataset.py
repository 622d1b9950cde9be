"""img2dataset output (CC3M, CC12M, SBU, LAION …; dataset_formats.md §4.2).

``--ann`` takes the shard tars (``00000.tar`` …, webdataset output) and/or the per-shard folders of the ``files``
output format. Each successful sample there is ``<key>.jpg`` (or png/webp) + ``<key>.json`` + optional
``<key>.txt``; the caption comes from ``.txt``, else the ``caption`` meta field. Every meta field is optional.
Keys become ``<output folder name>_<img2dataset key>`` (e.g. ``cc3m_000120005``).
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any, Iterator

from mplug_ds.data.formats.common import AnnotationError, ReaderArgs, Skip, safe_key
from mplug_ds.data.sample import Sample

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def read_img2dataset(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """Caption samples carrying their image bytes, in shard then key order."""
    for path in args.ann:
        members = _folder_members(path) if path.is_dir() else _tar_members(path)
        group: dict[str, bytes] = {}
        current = None
        for key, ext, data in members:
            if isinstance(data, Skip):
                yield data
                continue
            if key != current and current is not None:
                yield _to_sample(path, current, group)
                group = {}
            current = key
            group[ext] = data
        if current is not None:
            yield _to_sample(path, current, group)


def _tar_members(path: Path) -> Iterator[tuple[str, str, Any]]:
    try:
        tar = tarfile.open(path, mode="r:*")
    except (OSError, tarfile.TarError) as err:
        raise AnnotationError(path, f"not a readable tar ({err})",
                              "pass the NNNNN.tar shards written by img2dataset (--output_format webdataset)") from None
    with tar:
        try:
            for info in tar:
                if not info.isreg() or "." not in Path(info.name).name:
                    continue
                key, ext = _split_name(info.name)
                yield key, ext, tar.extractfile(info).read()
        except (OSError, tarfile.TarError, EOFError) as err:
            yield "", "", Skip(str(path), "(rest of tar)", f"tar is damaged, later samples lost: {err}")


def _folder_members(path: Path) -> Iterator[tuple[str, str, Any]]:
    for file in sorted(p for p in path.iterdir() if p.is_file() and "." in p.name):
        key, ext = _split_name(file.name)
        try:
            yield key, ext, file.read_bytes()
        except OSError as err:
            yield "", "", Skip(str(file), key, f"unreadable file: {err}")


def _split_name(name: str) -> tuple[str, str]:
    base = Path(name).name
    key, ext = base.split(".", 1)
    return key, ext.lower()


def _to_sample(path: Path, key: str, members: dict[str, bytes]) -> Sample | Skip:
    dataset = path.resolve().parent.name
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return Skip(str(path), key, f"malformed row: bad {key}.json ({err})")
        if not isinstance(meta, dict):
            return Skip(str(path), key, f"malformed row: {key}.json is not a JSON object")
    if meta.get("status", "success") != "success":
        return Skip(str(path), key, f"img2dataset status {meta.get('status')!r}: {meta.get('error_message')}")
    image_ext = next((e for e in _IMAGE_EXTS if e in members), None)
    if image_ext is None:
        return Skip(str(path), key, f"missing image: no .jpg/.png/.webp member (members: {sorted(members)})")
    if "txt" in members:
        caption = members["txt"].decode("utf-8", errors="replace")
    else:
        caption = meta.get("caption")
        if not isinstance(caption, str):
            return Skip(str(path), key, "malformed row: no caption (.txt member or 'caption' meta field)")
    extra = {k: meta[k] for k in ("url",) if isinstance(meta.get(k), str)}
    return Sample(key=safe_key(dataset, key), task="caption", image=members[image_ext], texts=[caption.strip()],
                  image_id=key, extra=extra)
