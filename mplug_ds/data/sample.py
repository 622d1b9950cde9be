"""The canonical sample every on-disk format reader produces, and how it is stored in a shard.

Readers (``mplug_ds.data.formats``) turn each annotation format into ``Sample`` objects; nothing after the
reader knows which format a sample came from.

Shard layout (one WebDataset sample per ``Sample``):
  ``<key>.jpg``            the image bytes (``<key>.left.jpg`` / ``<key>.right.jpg`` for NLVR2 pairs)
  ``<key>.mp4``            a video sample's encoded bytes, as in the source file (``.avi``, ``.webm``, ``.mkv``,
                           ``.mov`` keep their container's extension; ``make_shards --resize`` writes ``.mp4``)
  ``<key>.json``           every other field of the sample (see ``Sample.meta_json``)

Conventions:
  * ``key`` is unique within a dataset and contains no dots (WebDataset splits keys at the first dot).
  * Boxes are ``[x0, y0, x1, y1]`` in absolute pixels of the **stored** image (after any resize made by
    ``make_shards --resize``), x to the right, y down, x1/y1 exclusive (a box covering pixels 0..15 is
    ``[0, 0, 16, 16]``).
  * ``answers`` and ``answer_weights`` are parallel lists (VQA: weight = share of annotators, VG: 0.5).
  * Videos: one sample per video. ``video_caption``: ``texts`` are its captions (retrieval and captioning).
    ``video_qa``: ``texts[i]`` is the i-th question about the video and ``answers[i]`` its answer (weight 1.0);
    ``extra["question_ids"][i]`` and ``extra["answer_types"][i]`` belong to it too. The shard writer records what
    it decoded in ``extra["video"]`` (``format``, ``frames``, ``width``, ``height``, ``fps``, ``codec``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

# retrieval: preparation only; video_caption / video_qa: video samples
Task = Literal["caption", "region", "vqa", "grounding", "nlvr2", "ve", "retrieval", "video_caption", "video_qa"]


PAYLOADS = ("image", "images", "video")  # the fields stored as their own shard members
VIDEO_EXTS = ("mp4", "avi", "webm", "mkv", "mov")  # shard members (and file suffixes) holding a video


@dataclass
class Sample:
    """One training/evaluation example in the project's single canonical form."""

    key: str
    task: Task
    image: str | bytes | None = None  # path to an image file, or encoded image bytes
    images: list[str | bytes] = field(default_factory=list)  # NLVR2: [left, right]
    video: str | bytes | None = None  # path to a video file, or its encoded bytes
    texts: list[str] = field(default_factory=list)  # captions / question / expression / hypothesis / sentence
    boxes: list[list[float]] = field(default_factory=list)  # xyxy pixels; for regions, boxes[i] pairs with texts[i]
    answers: list[str] = field(default_factory=list)
    answer_weights: list[float] = field(default_factory=list)
    label: int | None = None  # NLVR2 (0/1), SNLI-VE (0 contradiction, 1 neutral, 2 entailment)
    image_id: str | None = None
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific fields kept for evaluation

    def meta_json(self) -> bytes:
        """The ``.json`` member of the shard: every field except the image and video payloads."""
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in PAYLOADS}
        return json.dumps(meta, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_meta(cls, meta: dict[str, Any], **images: Any) -> "Sample":
        """Rebuild a Sample from a shard's ``.json`` member plus image or video payloads."""
        return cls(**meta, **images)
