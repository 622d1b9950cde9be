"""Video–caption rows of BLIP, ALPRO, LAVIS and VindLU / UMT (video_tasks.md §2.2, §2.7).

JSON lines or a JSON array of ``{"clip_name": "video7020", "caption": str}`` (BLIP / mPLUG ``msrvtt_test.jsonl``,
ALPRO ``txt/{train,val,test}.jsonl``) or ``{"video": "video7020.mp4", "caption": str | [str]}`` (LAVIS
``retrieval_*.json``, VindLU / UMT ``msrvtt_ret_*.json``). Rows naming the same video are merged: one
``video_caption`` sample per video with all its captions. The video is ``--images``/<name> (``<name>.mp4`` etc. when
the name has no container suffix); the split comes from the file name (``train`` / ``val`` / ``test``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from mplug_ds.data.formats.common import (
    MalformedRow,
    ReaderArgs,
    Skip,
    is_json_array,
    iter_json_lines,
    load_json,
    need,
    safe_key,
    split_in_name,
    text_list,
    video_file,
)
from mplug_ds.data.sample import Sample


def video_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(row name, row)`` of a JSON array or JSON-lines file (an unparseable line is a ``MalformedRow``)."""
    if is_json_array(path):
        yield from ((f"[{i}]", row) for i, row in enumerate(load_json(path, list)))
    else:
        yield from ((f"line {n}", row) for n, row in iter_json_lines(path))


def video_name(row: Any) -> str:
    """The row's video: ``clip_name`` (BLIP / ALPRO) or ``video`` (LAVIS / VindLU)."""
    if isinstance(row, dict) and "clip_name" in row:
        return need(row, "clip_name", str)
    return need(row, "video", str)


def read_video_text(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """One sample per distinct video (per file), captions in row order."""
    root = args.image_root()
    for path in args.ann:
        split = split_in_name(path)
        merged: dict[str, Sample] = {}
        for name, row in video_rows(path):
            try:
                if isinstance(row, MalformedRow):
                    raise row
                video = video_name(row)
                texts = text_list(need(row, "caption", (str, list)), "caption")
            except MalformedRow as err:
                yield Skip(str(path), name, f"malformed row: {err}")
                continue
            stem = Path(video).stem
            sample = merged.get(video)
            if sample is None:
                sample = merged[video] = Sample(key=safe_key("video", split, stem), task="video_caption",
                                                image_id=stem, split=split, video=video_file(root, video))
            sample.texts += texts
        yield from merged.values()
