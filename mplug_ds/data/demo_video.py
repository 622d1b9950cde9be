"""The demo's video world: short H.264 clips of the demo's shapes moving, appearing, disappearing or changing colour,
written in the real video formats, so every video reader and task runs end to end without downloading anything.

Each clip (8–16 frames at 64 px, 8 fps, a few KB) shows one actor shape doing one thing — moving left, right, up or
down, appearing, disappearing, or turning another colour — over a demo background, sometimes beside a still
distractor shape. Frames are drawn with the image demo's renderer (``demo.render``), so shapes look as in the image
pre-training. What a clip does decides its captions and questions, and the clips are built so that a single frame
cannot tell it: the middle frame's position is drawn independently of the direction, and the moment a shape appears,
disappears or changes colour is spread over the clip's middle half. Questions of type ``direction`` ("which way does
the red circle move?"), ``appear`` and ``change`` therefore need several frames *in order* (a model sees the order
only through a temporal embedding); ``shape`` questions are answerable from one frame. Generation is deterministic
given the seed.

Layout under ``out`` (``video_shard_inputs`` gives the matching reader arguments):
  videos/TrainValVideo/video<N>.mp4, videos/TestVideo/video<N>.mp4   the clips (MSR-VTT layout and names)
  msrvtt/MSRVTT_data.json                                        MSR-VTT retrieval (splits train / validate / test)
  msrvtt_qa/txt/{train,val,test}.jsonl, msrvtt_qa/txt/train_ans2label.json   ALPRO / mPLUG video QA
  vatex/vatex_training_v1.0.json, vatex_validation_v1.0.json, vatex_public_test_english_v1.1.json   VATEX captions
  vatex/videos/<videoID>.mp4                                     the same clips under VATEX names (hard links)
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mplug_ds.data.demo import COLORS, SHAPES, TEXTURES, Group, Scene, Shape, render, split_sizes
from mplug_ds.data.video import encode_video

CLIP_SIZE = 64
FPS = 8
FRAMES = (8, 16)  # frames per clip, drawn uniformly
SIDE = 18  # shape side in pixels (about the image demo's shapes at the model's 64 px)
TRAVEL = 22  # pixels a moving shape covers from the first frame to the last
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DIRECTION_WORDS = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
EVENTS = ("move", "move", "appear", "disappear", "change")  # moves twice as often: four directions to learn
SPLIT_NAMES = {"train": "train", "val": "validate", "test": "test"}  # the MSR-VTT release's split names


@dataclass
class Clip:
    """Everything known about one demo clip."""

    number: int
    split: str
    frames: int
    texture: str
    color: str
    kind: str
    event: str  # move | appear | disappear | change
    direction: str | None = None  # move: left | right | up | down
    new_color: str | None = None  # change: the colour it turns
    switch: int = 0  # appear / disappear / change: the first frame after the switch
    middle: tuple[float, float] = (32.0, 32.0)  # the actor's centre at the clip's middle
    distractor: tuple[str, str, tuple[int, int, int, int]] | None = None  # (colour, kind, box)
    captions: list[str] = field(default_factory=list)
    questions: list[tuple[str, str, str]] = field(default_factory=list)  # (question, answer, type)

    @property
    def video_id(self) -> str:
        return f"video{self.number}"

    @property
    def vatex_id(self) -> str:
        return f"demo{self.number:07d}_000000_{math.ceil(self.frames / FPS):06d}"  # <id>_<start s>_<end s>


def _box(cx: float, cy: float) -> tuple[int, int, int, int]:
    x0, y0 = round(cx - SIDE / 2), round(cy - SIDE / 2)
    return x0, y0, x0 + SIDE, y0 + SIDE


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int = 2) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def actor_box(clip: Clip, t: int) -> tuple[int, int, int, int] | None:
    """The actor's box in frame ``t`` (``None`` while it is not there)."""
    cx, cy = clip.middle
    if clip.event == "move":
        dx, dy = DIRECTIONS[clip.direction]
        shift = (t / (clip.frames - 1) - 0.5) * TRAVEL
        return _box(cx + dx * shift, cy + dy * shift)
    visible = t >= clip.switch if clip.event == "appear" else t < clip.switch if clip.event == "disappear" else True
    return _box(cx, cy) if visible else None


def make_clip(rng: random.Random, number: int, split: str) -> Clip:
    """Draw one clip's facts, captions and questions."""
    color, kind = rng.choice(list(COLORS)), rng.choice(SHAPES)
    event = rng.choice(EVENTS)
    frames = rng.randint(*FRAMES)
    clip = Clip(number, split, frames, rng.choice(TEXTURES), color, kind, event,
                switch=rng.randint(round(frames / 4), round(3 * frames / 4)))
    low, high = SIDE / 2 + 1, CLIP_SIZE - SIDE / 2 - 1
    if event == "move":
        clip.direction = rng.choice(list(DIRECTIONS))
        along = rng.uniform(low + TRAVEL / 2, high - TRAVEL / 2)  # the middle position, whatever the direction
        across = rng.uniform(low, high)
        clip.middle = (along, across) if clip.direction in ("left", "right") else (across, along)
    else:
        clip.middle = (rng.uniform(low, high), rng.uniform(low, high))
        if event == "change":
            clip.new_color = rng.choice([c for c in COLORS if c != color])
    if rng.random() < 0.5:
        swept = [b for b in (actor_box(clip, t) for t in (0, frames - 1)) if b is not None]
        area = (min(b[0] for b in swept), min(b[1] for b in swept), max(b[2] for b in swept), max(b[3] for b in swept))
        for _ in range(50):
            box = _box(rng.uniform(low, high), rng.uniform(low, high))
            if not _overlaps(box, area):
                others = [c for c in COLORS if c not in (color, clip.new_color)]
                clip.distractor = (rng.choice(others), rng.choice([k for k in SHAPES if k != kind]), box)
                break
    clip.captions = make_captions(clip)
    clip.questions = make_questions(clip, rng)
    return clip


def make_captions(clip: Clip) -> list[str]:
    """Four captions of what the clip shows."""
    c, k, bg = clip.color, clip.kind, clip.texture
    beside = f"next to a {clip.distractor[0]} {clip.distractor[1]}" if clip.distractor else "in a short clip"
    if clip.event == "move":
        way = DIRECTION_WORDS[clip.direction]
        return [f"a {c} {k} moves {way}", f"a picture of a {c} {k} moving {way}",
                f"the {c} {k} slides {way} on a {bg} background", f"a {c} {k} moves {way} {beside}"]
    if clip.event in ("appear", "disappear"):
        verb = clip.event + "s"
        return [f"a {c} {k} {verb}", f"a picture of a {c} {k} {clip.event}ing",
                f"a {c} {k} {verb} on a {bg} background", f"a {c} {k} {verb} {beside}"]
    n = clip.new_color
    return [f"a {k} turns from {c} to {n}", f"a picture of a {c} {k} turning {n}",
            f"the {k} changes color from {c} to {n} on a {bg} background", f"a {c} {k} turns {n} {beside}"]


def make_questions(clip: Clip, rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, answer, type) about the clip; only ``shape`` questions can be answered from one frame. The
    ``change`` question is asked of every clip that changes colour and of a quarter of the others, so that "yes" and
    "no" are equally frequent."""
    c, k = clip.color, clip.kind
    if clip.event == "change":
        return [(f"does the {k} change color?", "yes", "change"), ("what shape changes color?", k, "shape")]
    asked = [(f"does the {k} change color?", "no", "change")] if rng.random() < 0.25 else []
    if clip.event == "move":
        return [(f"which way does the {c} {k} move?", clip.direction, "direction"), ("what shape moves?", k, "shape"),
                *asked]
    return [(f"does the {c} {k} appear or disappear?", clip.event, "appear"), *asked]


def render_clip(clip: Clip, seed: int) -> Iterator[Any]:
    """The clip's frames (PIL images): one background for the whole clip, the shapes of each frame on it."""
    for t in range(clip.frames):
        groups = []
        box = actor_box(clip, t)
        if box is not None:
            color = clip.new_color if clip.event == "change" and t >= clip.switch else clip.color
            groups.append(Group(color, clip.kind, "center", [Shape(color, clip.kind, box)]))
        if clip.distractor:
            d_color, d_kind, d_box = clip.distractor
            groups.append(Group(d_color, d_kind, "center", [Shape(d_color, d_kind, d_box)]))
        # the same image id every frame: render() seeds the background from it
        yield render(Scene(clip.number, clip.split, clip.texture, groups, CLIP_SIZE), seed)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _write_msrvtt(root: Path, clips: list[Clip]) -> None:
    videos = [{"category": 0, "url": f"https://demo.invalid/{c.video_id}", "video_id": c.video_id,
               "start time": 0.0, "end time": c.frames / FPS, "split": SPLIT_NAMES[c.split], "id": c.number}
              for c in clips]
    sentences, sen_id = [], 0
    for clip in clips:
        for caption in clip.captions:
            sentences.append({"caption": caption, "video_id": clip.video_id, "sen_id": sen_id})
            sen_id += 1
    _write_json(root / "msrvtt" / "MSRVTT_data.json",
                {"info": {"description": "mplug_ds procedural demo videos"}, "videos": videos, "sentences": sentences})


def _write_video_qa(root: Path, clips: list[Clip]) -> None:
    folder = root / "msrvtt_qa" / "txt"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        rows = [{"answer": answer, "question": question, "video_id": clip.video_id, "answer_type": kind}
                for clip in clips if clip.split == split for question, answer, kind in clip.questions]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    answers = sorted({a for clip in clips if clip.split == "train" for _, a, _ in clip.questions})
    _write_json(folder / "train_ans2label.json", {a: i for i, a in enumerate(answers)})


def _write_vatex(root: Path, clips: list[Clip]) -> None:
    files = {"train": "vatex_training_v1.0.json", "val": "vatex_validation_v1.0.json",
             "test": "vatex_public_test_english_v1.1.json"}
    for split, name in files.items():
        _write_json(root / "vatex" / name, [{"videoID": c.vatex_id, "enCap": c.captions} for c in clips
                                            if c.split == split])


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def video_path(root: Path, clip: Clip) -> Path:
    """Where a clip's MP4 is written (MSR-VTT layout)."""
    folder = "TestVideo" if clip.split == "test" else "TrainValVideo"
    return root / "videos" / folder / f"{clip.video_id}.mp4"


def generate_video_demo(out: Path | str, seed: int = 0, num_clips: int = 960) -> list[Clip]:
    """Make ``num_clips`` clips and write them with their annotations in every demo video format under ``out``."""
    root = Path(out)
    rng = random.Random(f"{seed}-video")
    clips, number = [], 0
    for split, n in split_sizes(num_clips).items():
        for _ in range(n):
            clips.append(make_clip(rng, number, split))
            number += 1
    for clip in clips:
        path = video_path(root, clip)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_video(render_clip(clip, seed), FPS, CLIP_SIZE, CLIP_SIZE))
        _link(path, root / "vatex" / "videos" / f"{clip.vatex_id}.mp4")
    _write_msrvtt(root, clips)
    _write_video_qa(root, clips)
    _write_vatex(root, clips)
    return clips


def video_shard_inputs(root: Path) -> dict[str, dict[str, Any]]:
    """Reader arguments (format → ann files, video root) of a demo video world written to ``root``."""
    qa = root / "msrvtt_qa" / "txt"
    vatex = root / "vatex"
    return {
        "msrvtt": {"ann": [root / "msrvtt" / "MSRVTT_data.json"], "images": root / "videos"},
        "video-qa": {"ann": [qa / f"{split}.jsonl" for split in ("train", "val", "test")], "images": root / "videos"},
        "vatex": {"ann": [vatex / "vatex_training_v1.0.json", vatex / "vatex_validation_v1.0.json",
                          vatex / "vatex_public_test_english_v1.1.json"], "images": vatex / "videos"},
    }
