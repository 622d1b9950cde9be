"""Video question answering: MSRVTT-QA and MSVD-QA as released, and the ALPRO / LAVIS rows (video_tasks.md §2.3,
§2.4). One ``video_qa`` sample per video and split: ``texts[i]`` its i-th question, ``answers[i]`` the answer.

* ``msrvtt-qa``: ``{train,val,test}_qa.json`` arrays of ``{"question", "answer", "id", "video_id": 6513}``; the video
  is ``video<video_id>.mp4`` (under ``--images``, ``TrainValVideo/`` or ``TestVideo/``).
* ``msvd-qa``: the same rows with ``video_id`` N meaning ``vid<N>``, mapped to its YouTube clip by
  ``youtube_mapping.txt`` (lines ``<clip name> vid<N>``, passed among ``--ann``); the video is ``<clip name>.avi``.
* ``video-qa``: ALPRO / mPLUG JSON lines ``{"question", "answer", "video_id", "answer_type"}`` (``question_id`` = line
  number, as ALPRO assigns it) and LAVIS / UMT arrays ``{"question", "answer", "video", "question_id"}``; the video
  is ``<video_id>.<ext>`` under ``--images`` (or its MSR-VTT folders ``TrainValVideo/``, ``TestVideo/``). The
  candidate answers of ranking (ALPRO's ``train_ans2label.json``) are the task's ``task.options.answer_list``, not a
  reader input.

Splits come from the file names. Without an ``answer_type``, a question's type is its first word (what, who, how,
where, when; otherwise ``other``), the breakdown ALPRO reports.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterator

from mplug_ds.data.formats.common import (
    AnnotationError,
    MalformedRow,
    ReaderArgs,
    Skip,
    load_json,
    need,
    safe_key,
    split_in_name,
    video_file,
)
from mplug_ds.data.formats.msrvtt import VIDEO_FOLDERS
from mplug_ds.data.formats.video_text import video_name, video_rows
from mplug_ds.data.sample import Sample

QUESTION_WORDS = ("what", "who", "how", "where", "when")


def question_type(question: str) -> str:
    """The question's first word when it is one of ``QUESTION_WORDS``, else ``other``."""
    first = re.match(r"\s*([a-z]+)", question.lower())
    return first.group(1) if first and first.group(1) in QUESTION_WORDS else "other"


Question = tuple[str, str, Any, str]  # (question, answer, question id, answer type)


def _grouped(path: Path, rows: Iterator[tuple[str, Any]], dataset: str,
             parse: Callable[[Any, int], tuple[str, str, Question]]) -> Iterator[Sample | Skip]:
    """One sample per video of one file; ``parse(row, index)`` → (video key, video path, question)."""
    split = split_in_name(path)
    merged: dict[str, Sample] = {}
    for index, (name, row) in enumerate(rows):
        try:
            if isinstance(row, MalformedRow):
                raise row
            video, file, (question, answer, question_id, kind) = parse(row, index)
        except MalformedRow as err:
            yield Skip(str(path), name, f"malformed row: {err}")
            continue
        sample = merged.get(video)
        if sample is None:
            sample = merged[video] = Sample(key=safe_key(dataset, split, video), task="video_qa", image_id=video,
                                            split=split, video=file,
                                            extra={"question_ids": [], "answer_types": []})
        sample.texts.append(question)
        sample.answers.append(answer)
        sample.answer_weights.append(1.0)
        sample.extra["question_ids"].append(question_id)
        sample.extra["answer_types"].append(kind)
    yield from merged.values()


def _original(row: Any) -> tuple[str, str, Any, int]:
    question, answer = need(row, "question", str), need(row, "answer", str)
    return question, answer, need(row, "id", int), need(row, "video_id", int)


def read_msrvtt_qa(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """MSRVTT-QA ``*_qa.json``: one sample per MSR-VTT video."""
    root = args.image_root()

    def parse(row: Any, index: int) -> tuple[str, str, Question]:
        question, answer, question_id, number = _original(row)
        video = f"video{number}"
        return video, video_file(root, video, VIDEO_FOLDERS), (question, answer, question_id, question_type(question))

    for path in args.ann:
        yield from _grouped(path, ((f"[{i}]", r) for i, r in enumerate(load_json(path, list))), "msrvtt_qa", parse)


def read_youtube_mapping(path: Path) -> dict[int, str]:
    """MSVD's ``youtube_mapping.txt``: ``vid<N>`` number → YouTube clip name."""
    mapping = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].startswith("vid") or not parts[1][3:].isdigit():
            raise AnnotationError(path, f"line {number} is not '<clip name> vid<N>': {line!r}",
                                  "pass MSVD's youtube_mapping.txt unchanged")
        mapping[int(parts[1][3:])] = parts[0]
    return mapping


def read_msvd_qa(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """MSVD-QA ``*_qa.json`` + ``youtube_mapping.txt``: one sample per YouTube clip."""
    maps = [p for p in args.ann if p.suffix == ".txt"]
    if not maps:
        raise AnnotationError(args.ann[0], "no youtube_mapping.txt among the --ann files",
                              "pass MSVD's youtube_mapping.txt too (it maps vid<N> to the clip files)")
    mapping = {k: v for path in maps for k, v in read_youtube_mapping(path).items()}
    root = args.image_root()

    def parse(row: Any, index: int) -> tuple[str, str, Question]:
        question, answer, question_id, number = _original(row)
        if number not in mapping:
            raise MalformedRow(f"video_id {number} (vid{number}) is not in youtube_mapping.txt")
        clip = mapping[number]
        return clip, video_file(root, clip), (question, answer, question_id, question_type(question))

    for path in (p for p in args.ann if p.suffix != ".txt"):
        yield from _grouped(path, ((f"[{i}]", r) for i, r in enumerate(load_json(path, list))), "msvd_qa", parse)


def read_video_qa(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """ALPRO JSON lines / LAVIS arrays: one sample per video."""
    root = args.image_root()

    def parse(row: Any, index: int) -> tuple[str, str, Question]:
        video = need(row, "video_id", str) if isinstance(row, dict) and "video_id" in row else video_name(row)
        question, answer = need(row, "question", str), need(row, "answer", str)
        kind = row.get("answer_type") if isinstance(row.get("answer_type"), str) else question_type(question)
        file = video_file(root, video, VIDEO_FOLDERS)
        return Path(video).stem, file, (question, answer, row.get("question_id", index), kind)

    for path in args.ann:
        yield from _grouped(path, video_rows(path), "video_qa", parse)
