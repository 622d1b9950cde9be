"""VATEX captioning (video_tasks.md §2.5): ``vatex_training_v1.0.json``, ``vatex_validation_v1.0.json`` and
``vatex_public_test_english_v1.1.json``, arrays of ``{"videoID": "<YouTube id>_<start>_<end>", "enCap": [10 str],
"chCap"?}``. One ``video_caption`` sample per clip with its English captions; the video is ``<videoID>.mp4`` under
``--images``; the split comes from the file name (training → train, validation → val, public_test → test). The
private test file has no ``enCap``: its clips are reported as skipped (no references to score against).
"""
from __future__ import annotations

from typing import Any, Iterator

from mplug_ds.data.formats.common import (
    MalformedRow,
    ReaderArgs,
    Skip,
    load_json,
    need,
    rows_to_samples,
    safe_key,
    split_in_name,
    text_list,
    video_file,
)
from mplug_ds.data.sample import Sample


def read_vatex(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """One sample per ``videoID`` with its ``enCap`` captions."""
    root = args.image_root()
    for path in args.ann:
        split = split_in_name(path)

        def convert(row: Any) -> Sample:
            video = need(row, "videoID", str)
            if "enCap" not in row:
                raise MalformedRow("no 'enCap' (English captions): the private test set has none to score against")
            return Sample(key=safe_key("vatex", video), task="video_caption", image_id=video, split=split,
                          texts=text_list(row["enCap"], "enCap"), video=video_file(root, video))

        yield from rows_to_samples(path, ((f"[{i}]", row) for i, row in enumerate(load_json(path, list))), convert)
