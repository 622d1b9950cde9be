"""MSR-VTT retrieval: the original release and the published split lists (video_tasks.md §2.1, §2.2).

``--ann`` takes the video-info JSON — ``train_val_videodatainfo.json`` and/or ``test_videodatainfo.json``, or the
merged ``MSRVTT_data.json`` — ``{"videos": [{"video_id", "split", …}], "sentences": [{"video_id", "caption", …}]}``.
One ``video_caption`` sample per video with all its captions; video ``<video_id>.mp4`` under ``--images``
(also found in ``TrainValVideo/`` or ``TestVideo/`` there). Without split lists the splits are the release's
``train`` / ``validate`` / ``test`` (6,513 / 497 / 2,990 videos).

The published protocols come as split lists, given as ``--split-file NAME=FILE`` (repeatable): a CSV with a
``video_id`` column (CLIP4Clip's ``MSRVTT_train.9k.csv`` / ``MSRVTT_train.7k.csv``) or a text file with one video id
per line (``train_list_jsfusion.txt``); a CSV that also has a ``sentence`` column (``MSRVTT_JSFUSION_test.csv``, the
1k-A test) gives each of its videos that one caption, as the protocol scores it (one caption per video). Then only
the listed videos become samples, split NAME, e.g.
``--split-file train=MSRVTT_train.9k.csv --split-file test=MSRVTT_JSFUSION_test.csv`` (9k / 1k-A).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from mplug_ds.data.formats.common import (
    AnnotationError,
    MalformedRow,
    ReaderArgs,
    Skip,
    load_json,
    need,
    safe_key,
    video_file,
)
from mplug_ds.data.sample import Sample

VIDEO_FOLDERS = ("", "TrainValVideo", "TestVideo")


def read_msrvtt(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """One sample per video of the release's splits, or per listed video of each ``--split-file`` list."""
    splits: dict[str, str | None] = {}
    captions: dict[str, list[str]] = {}
    for path in args.ann:
        data = load_json(path, dict)
        if not isinstance(data.get("videos"), list) or not isinstance(data.get("sentences"), list):
            raise AnnotationError(path, "no 'videos' and 'sentences' lists",
                                  "pass MSRVTT_data.json or train_val_videodatainfo.json / test_videodatainfo.json")
        for index, video in enumerate(data["videos"]):
            try:
                splits[need(video, "video_id", str)] = video.get("split")
            except MalformedRow as err:
                yield Skip(str(path), f"videos[{index}]", f"malformed row: {err}")
        for index, sentence in enumerate(data["sentences"]):
            try:
                video_id, caption = need(sentence, "video_id", str), need(sentence, "caption", str)
                captions.setdefault(video_id, []).append(caption)
            except MalformedRow as err:
                yield Skip(str(path), f"sentences[{index}]", f"malformed row: {err}")
    root = args.image_root()

    def sample(video_id: str, split: str | None, texts: list[str]) -> Sample:
        return Sample(key=safe_key("msrvtt", video_id), task="video_caption", texts=texts, image_id=video_id,
                      split=split, video=video_file(root, video_id, VIDEO_FOLDERS))

    if not args.split_files:
        for video_id, split in splits.items():
            if video_id not in captions:
                yield Skip(str(args.ann[0]), video_id, "video has no caption in the annotation files")
                continue
            yield sample(video_id, split, captions[video_id])
        return
    for name, path in args.split_files.items():
        for video_id, sentence in read_split_list(path):
            if sentence is None and video_id not in captions:
                yield Skip(str(path), video_id, "listed video has no caption in the annotation files")
                continue
            yield sample(video_id, name, [sentence] if sentence is not None else captions[video_id])


def read_split_list(path: Path) -> list[tuple[str, str | None]]:
    """``(video_id, its one caption or None)`` of a split list: a CSV with ``video_id`` (and ``sentence``), or a text
    file of video ids."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise AnnotationError(path, f"{type(err).__name__}: {err}", "check the --split-file path") from None
    if path.suffix.lower() != ".csv":
        return [(line.strip(), None) for line in text.splitlines() if line.strip()]
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or "video_id" not in rows[0]:
        raise AnnotationError(path, "no 'video_id' column", "pass CLIP4Clip's MSRVTT_train.9k.csv / "
                                                           "MSRVTT_JSFUSION_test.csv or a text file of video ids")
    return [(row["video_id"], row.get("sentence")) for row in rows]
