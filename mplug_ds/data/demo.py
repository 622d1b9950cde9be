"""A procedural demo world written in the real on-disk formats, so every reader and task can run end to end
without downloading anything.

Each image shows one or two groups of 1–3 identical shapes (circle, square, triangle, diamond) in one of six
colours, placed left / right / top / bottom / center, on a textured background (plain, striped, checkered, dotted,
noisy). Every caption, question, region phrase and referring expression is derived from those facts, so a tiny
model can learn them quickly. Generation is deterministic given the seed.

Layout under ``out`` (see ``DemoLayout.shard_inputs`` for the matching ``make_shards`` arguments):
  coco/train2014/COCO_train2014_%012d.jpg, coco/val2014/...  the images (train split / val + test splits)
  coco/dataset_coco.json                                    Karpathy-style captions (splits train/val/test)
  albef/retrieval_{train,val,test}.json                      ALBEF retrieval JSON (paths relative to coco/)
  vg/VG_100K/<id>.jpg, vg/region_descriptions.json, vg/image_data.json
  vqa/v2_OpenEnded_mscoco_{train,val}2014_questions.json, vqa/v2_mscoco_{train,val}2014_annotations.json
  refcoco/refs(unc).p, refcoco/instances.json               splits train / val / testA / testB
  nlvr2/{train,dev,test1}.json, nlvr2/images/...            image pairs (JPEG bytes under .png names, as in NLVR2)
  snli_ve/snli_ve_{train,dev,test}.jsonl, snli_ve/flickr30k-images/<id>.jpg
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (30, 160, 60), "blue": (35, 75, 215),
    "yellow": (240, 205, 30), "purple": (135, 50, 185), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
POSITIONS: dict[str, tuple[int, int]] = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2),
                                         "center": (1, 1)}  # (column, row) in a 3x3 grid
TEXTURES = ("plain", "striped", "checkered", "dotted", "noisy")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"grey": (205, 205, 205), "beige": (228, 218, 195),
                                                "light blue": (198, 212, 226), "light green": (210, 225, 205)}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
PLACE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                 "center": "in the center"}
SPLITS = ("train", "val", "test")
SHAPE_SIDE = (0.8, 0.95)
MAX_COUNT = 2  # a lone shape's side as a fraction of its grid cell (groups of 2–3 share the cell)


@dataclass
class Shape:
    """One drawn shape; ``box`` is xyxy pixels (x1/y1 exclusive)."""

    color: str
    kind: str
    box: tuple[int, int, int, int]


@dataclass
class Group:
    """1–3 identical shapes placed in one grid cell."""

    color: str
    kind: str
    position: str
    shapes: list[Shape]

    @property
    def count(self) -> int:
        return len(self.shapes)

    def phrase(self, article: bool = True) -> str:
        """``"two red circles"`` / ``"a blue square"``."""
        noun = self.kind + ("s" if self.count > 1 else "")
        number = ("a" if article else "one") if self.count == 1 else NUMBER_WORDS[self.count]
        return f"{number} {self.color} {noun}"

    def box(self) -> tuple[int, int, int, int]:
        return (min(s.box[0] for s in self.shapes), min(s.box[1] for s in self.shapes),
                max(s.box[2] for s in self.shapes), max(s.box[3] for s in self.shapes))


@dataclass
class Scene:
    """Everything known about one demo image."""

    image_id: int
    split: str
    texture: str
    groups: list[Group]
    size: int
    background: str = "grey"  # a key of BACKGROUNDS
    captions: list[str] = field(default_factory=list)

    @property
    def folder(self) -> str:
        return "train2014" if self.split == "train" else "val2014"

    @property
    def file_name(self) -> str:
        return f"COCO_{self.folder}_{self.image_id:012d}.jpg"

    def group_of(self, kind: str) -> Group | None:
        return next((g for g in self.groups if g.kind == kind), None)


@dataclass
class DemoLayout:
    """Where the demo was written and how to shard each format (``make_shards`` arguments per format)."""

    root: Path
    scenes: list[Scene]
    shard_inputs: dict[str, dict[str, Any]]


# --------------------------------------------------------------------------------------------------
# World and rendering
# --------------------------------------------------------------------------------------------------
def make_scene(rng: random.Random, image_id: int, split: str, size: int) -> Scene:
    """Draw the facts of one image: 1–2 groups with distinct colours, shapes and positions."""
    n_groups = rng.choice((1, 2))
    colors = rng.sample(list(COLORS), n_groups)
    kinds = rng.sample(SHAPES, n_groups)
    positions = rng.sample(list(POSITIONS), n_groups)
    cell = size / 3
    groups = []
    for color, kind, position in zip(colors, kinds, positions):
        count = rng.randint(1, MAX_COUNT)
        col, row = POSITIONS[position]
        # Shapes fill most of their cell (a lone shape ~70% of the cell side, ~23% of the image): small shapes
        # cover too few pixels (and ViT patches) for a tiny model trained from scratch to see them.
        side = int(min(cell * rng.uniform(*SHAPE_SIDE), cell / count - 2))
        slack = (cell - side) / 2  # jitter that keeps the shape inside its cell
        shapes = []
        for i in range(count):
            cx = col * cell + cell * (i + 0.5) / count + rng.uniform(-1.5, 1.5)
            cy = row * cell + cell / 2 + rng.uniform(-slack, slack) * 0.8
            x0 = min(max(int(cx - side / 2), 0), size - side)
            y0 = min(max(int(cy - side / 2), 0), size - side)
            shapes.append(Shape(color, kind, (x0, y0, x0 + side, y0 + side)))
        groups.append(Group(color, kind, position, shapes))
    scene = Scene(image_id, split, rng.choice(TEXTURES), groups, size, rng.choice(list(BACKGROUNDS)))
    scene.captions = make_captions(rng, scene)
    return scene


@lru_cache(maxsize=16)
def _pattern(texture: str, size: int) -> np.ndarray:
    """The fixed brightness pattern of a texture (noise textures are drawn per image instead)."""
    y, x = np.ogrid[0:size, 0:size]
    if texture == "striped":
        return (((x + y) // 10 % 2) * 22.0 - 11).astype(np.float32)
    if texture == "checkered":
        return (((x // 24 + y // 24) % 2) * 22.0 - 11).astype(np.float32)
    if texture == "dotted":
        return np.where(((x % 16 - 8) ** 2 + (y % 16 - 8) ** 2) < 6, -30.0, 0.0).astype(np.float32)
    return np.zeros((size, size), np.float32)


def _texture(scene: Scene, rng: np.random.Generator, base: tuple[int, int, int]) -> np.ndarray:
    pattern = _pattern(scene.texture, scene.size)
    if scene.texture in ("noisy", "plain"):
        sigma = 14.0 if scene.texture == "noisy" else 2.0
        pattern = pattern + sigma * rng.standard_normal((scene.size, scene.size), dtype=np.float32)
    pixels = np.asarray(base, dtype=np.float32)[None, None, :] + pattern[..., None]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def render(scene: Scene, seed: int) -> Image.Image:
    """The image of a scene: textured background, then the shapes."""
    rng = np.random.default_rng([seed, scene.image_id])
    image = Image.fromarray(_texture(scene, rng, BACKGROUNDS[scene.background]))
    draw = ImageDraw.Draw(image)
    for group in scene.groups:
        for shape in group.shapes:
            x0, y0, x1, y1 = shape.box
            fill, box = COLORS[shape.color], (x0, y0, x1 - 1, y1 - 1)
            if shape.kind == "circle":
                draw.ellipse(box, fill=fill)
            elif shape.kind == "square":
                draw.rectangle(box, fill=fill)
            elif shape.kind == "triangle":
                draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
            else:
                draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, (y0 + y1) / 2), ((x0 + x1) / 2, y1 - 1),
                              (x0, (y0 + y1) / 2)], fill=fill)
    return image


# --------------------------------------------------------------------------------------------------
# Language
# --------------------------------------------------------------------------------------------------
def _described(scene: Scene) -> str:
    return " and ".join(f"{g.phrase()} {PLACE_PHRASES[g.position]}" for g in scene.groups)


def make_captions(rng: random.Random, scene: Scene) -> list[str]:
    """Five captions (raw, sentence case with a period, like COCO), each naming every group, where it is and the
    background, so that a caption fits its own image and few others (a world this small repeats its scenes:
    captions naming less would also be true of other images, and a matching head could not learn from them)."""
    content = _described(scene)
    background = f"{scene.background} {scene.texture} background"
    things = " and ".join(g.phrase() for g in scene.groups)
    places = ", ".join(f"the {g.kind}{'s are' if g.count > 1 else ' is'} {PLACE_PHRASES[g.position]}"
                       for g in scene.groups)
    templates = [
        f"{content} on a {background}.",
        f"a picture of {content}, on a {background}.",
        f"a {background} with {content}.",
        f"an image showing {things} on a {background}; {places}.",
        f"{content}; the background is {scene.texture} and {scene.background}.",
    ]
    rng.shuffle(templates)
    return [t[0].upper() + t[1:] for t in templates]


def _noisy_answers(rng: random.Random, answer: str, alternatives: list[str]) -> list[str]:
    """Ten annotator answers: mostly ``answer``, a few from ``alternatives``."""
    wrong = rng.choice((0, 0, 1, 2))
    answers = [answer] * (10 - wrong) + [rng.choice(alternatives) for _ in range(wrong)]
    rng.shuffle(answers)
    return answers


def make_questions(rng: random.Random, scene: Scene) -> list[tuple[str, str, str, list[str]]]:
    """(question, answer_type, question_type, ten raw answers) for one scene."""
    questions = []
    for group in scene.groups:
        noun = group.kind + ("s" if group.count > 1 else "")
        verb = "are" if group.count > 1 else "is"
        other_colors = [c for c in COLORS if c != group.color]
        questions.append((f"What color {verb} the {noun}?", "other", "what color is the",
                          _noisy_answers(rng, group.color, other_colors)))
        questions.append((f"How many {group.kind}s are there?", "number", "how many",
                          _noisy_answers(rng, str(group.count), [NUMBER_WORDS[group.count], str(group.count % 3 + 1)])))
        questions.append((f"What shape is {PLACE_PHRASES[group.position]}?", "other", "what",
                          _noisy_answers(rng, group.kind, [k for k in SHAPES if k != group.kind])))
        questions.append((f"Where is the {group.color} {group.kind}?", "other", "where is the",
                          _noisy_answers(rng, group.position, [p for p in POSITIONS if p != group.position])))
    color, kind = rng.choice(list(COLORS)), rng.choice(SHAPES)
    present = any(g.color == color and g.kind == kind for g in scene.groups)
    if not present and rng.random() < 0.5:
        color, kind, present = scene.groups[0].color, scene.groups[0].kind, True
    yes_no = "yes" if present else "no"
    questions.append((f"Is there a {color} {kind}?", "yes/no", "is there a",
                      _noisy_answers(rng, yes_no, ["no" if present else "yes"])))
    return questions


def _referring(group: Group, index: int) -> list[str]:
    """Two expressions for shape ``index`` of ``group`` (ordinal words when the group has several)."""
    where = PLACE_PHRASES[group.position]
    if group.count == 1:
        return [f"{group.color} {group.kind}", f"the {group.kind} {where}"]
    ordinal = {0: "leftmost", group.count - 1: "rightmost"}.get(index, "middle")
    return [f"{ordinal} {group.color} {group.kind}", f"the {ordinal} {group.kind} {where}"]


# --------------------------------------------------------------------------------------------------
# Writers, one per real format
# --------------------------------------------------------------------------------------------------
def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _tokens(text: str) -> list[str]:
    return [w.strip(".,?!").lower() for w in text.split() if w.strip(".,?!")]


def _write_karpathy(root: Path, scenes: list[Scene]) -> None:
    images, sent_id = [], 0
    for index, scene in enumerate(scenes):
        sentences = []
        for caption in scene.captions:
            sentences.append({"tokens": _tokens(caption), "raw": caption, "imgid": index, "sentid": sent_id})
            sent_id += 1
        images.append({"filepath": scene.folder, "sentids": [s["sentid"] for s in sentences],
                       "filename": scene.file_name, "imgid": index, "split": scene.split,
                       "sentences": sentences, "cocoid": scene.image_id})
    _write_json(root / "coco" / "dataset_coco.json", {"images": images, "dataset": "coco"})


def _write_albef(root: Path, scenes: list[Scene]) -> None:
    for split in SPLITS:
        chosen = [s for s in scenes if s.split == split]
        if split == "train":
            rows = [{"image": f"{s.folder}/{s.file_name}", "caption": c, "image_id": f"coco_{s.image_id}"}
                    for s in chosen for c in s.captions]
        else:
            rows = [{"image": f"{s.folder}/{s.file_name}", "caption": s.captions} for s in chosen]
        _write_json(root / "albef" / f"retrieval_{split}.json", rows)


def _write_vg(root: Path, scenes: list[Scene]) -> None:
    descriptions, image_data, region_id = [], [], 0
    for scene in scenes:
        regions = []

        def add(phrase: str, box: tuple[int, int, int, int]) -> None:
            nonlocal region_id
            region_id += 1
            regions.append({"region_id": region_id, "width": box[2] - box[0], "height": box[3] - box[1],
                            "image_id": scene.image_id, "phrase": phrase, "y": box[1], "x": box[0]})

        for group in scene.groups:
            add(group.phrase(), group.box())
            if group.count > 1:
                for shape in group.shapes:
                    add(f"a {shape.color} {shape.kind}", shape.box)
        add(f"a {scene.background} {scene.texture} background", (0, 0, scene.size, scene.size))
        descriptions.append({"id": scene.image_id, "regions": regions})
        image_data.append({"image_id": scene.image_id, "width": scene.size, "height": scene.size, "coco_id": None,
                           "flickr_id": None, "url": f"https://demo.invalid/VG_100K/{scene.image_id}.jpg"})
        _link(root / "coco" / scene.folder / scene.file_name, root / "vg" / "VG_100K" / f"{scene.image_id}.jpg")
    _write_json(root / "vg" / "region_descriptions.json", descriptions)
    _write_json(root / "vg" / "image_data.json", image_data)


def _write_vqa(root: Path, scenes: list[Scene], rng: random.Random) -> None:
    info = {"description": "mplug_ds procedural demo", "version": "1.0", "year": 2024}
    license_ = {"name": "CC0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
    for subtype in ("train2014", "val2014"):
        questions, annotations = [], []
        for scene in (s for s in scenes if s.folder == subtype):
            for k, (question, answer_type, question_type, answers) in enumerate(make_questions(rng, scene)):
                question_id = scene.image_id * 1000 + k
                questions.append({"image_id": scene.image_id, "question": question, "question_id": question_id})
                consensus = max(set(answers), key=lambda a: (answers.count(a), a))
                annotations.append({
                    "question_id": question_id, "image_id": scene.image_id, "question_type": question_type,
                    "answer_type": answer_type, "multiple_choice_answer": consensus,
                    "answers": [{"answer": a, "answer_confidence": "yes" if a == consensus else "maybe",
                                 "answer_id": i + 1} for i, a in enumerate(answers)]})
        common = {"info": info, "license": license_, "data_type": "mscoco", "data_subtype": subtype}
        _write_json(root / "vqa" / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
                    {**common, "task_type": "Open-Ended", "questions": questions})
        _write_json(root / "vqa" / f"v2_mscoco_{subtype}_annotations.json", {**common, "annotations": annotations})


def _write_refcoco(root: Path, scenes: list[Scene]) -> None:
    images, annotations, refs = [], [], []
    ann_id = ref_id = sent_id = 0
    test_index = 0
    for scene in scenes:
        images.append({"id": scene.image_id, "file_name": scene.file_name, "height": scene.size,
                       "width": scene.size, "license": 1})
        if scene.split == "test":
            split, test_index = ("testA" if test_index % 2 == 0 else "testB"), test_index + 1
        else:
            split = scene.split
        for group in scene.groups:
            for index, shape in enumerate(group.shapes):
                ann_id, ref_id = ann_id + 1, ref_id + 1
                x0, y0, x1, y1 = shape.box
                category = SHAPES.index(shape.kind) + 1
                annotations.append({"id": ann_id, "image_id": scene.image_id, "category_id": category,
                                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                                    "area": float((x1 - x0) * (y1 - y0)), "iscrowd": 0,
                                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
                sentences = []
                for text in _referring(group, index):
                    sent_id += 1
                    sentences.append({"sent_id": sent_id, "raw": text.capitalize(), "sent": text,
                                      "tokens": text.split()})
                refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": scene.image_id,
                             "category_id": category, "split": split,
                             "file_name": f"{scene.file_name[:-4]}_{ann_id}.jpg",
                             "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences})
    categories = [{"supercategory": "shape", "id": i + 1, "name": k} for i, k in enumerate(SHAPES)]
    _write_json(root / "refcoco" / "instances.json",
                {"images": images, "annotations": annotations, "categories": categories})
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)


def _nlvr_statements(rng: random.Random, left: Scene, right: Scene) -> tuple[str, str]:
    """A true and a false statement about the pair from one template, so only the images tell them apart: a
    colour-and-shape claim about the left or the right image (true: a group that image has; false: a pair of
    colour and shape it lacks), or "Both images contain a <shape>." (false: a shape only one image has)."""
    def facts(scene: Scene) -> set[tuple[str, str]]:
        return {(g.color, g.kind) for g in scene.groups}

    kinds = [{g.kind for g in scene.groups} for scene in (left, right)]
    shared, one_side = kinds[0] & kinds[1], kinds[0] ^ kinds[1]
    if shared and one_side and rng.random() < 1 / 3:
        template = "Both images contain a {}."
        return template.format(rng.choice(sorted(shared))), template.format(rng.choice(sorted(one_side)))
    side, scene = rng.choice((("left", left), ("right", right)))
    template = f"The {side} image contains a {{}} {{}}."
    true = rng.choice(sorted(facts(scene)))
    false = rng.choice([(c, k) for c in COLORS for k in SHAPES if (c, k) not in facts(scene)])
    return template.format(*true), template.format(*false)


def _write_nlvr2(root: Path, scenes: list[Scene], rng: random.Random) -> None:
    for split, name in zip(SPLITS, ("train", "dev", "test1")):
        chosen = [s for s in scenes if s.split == split]
        lines = []
        for set_id, left in enumerate(chosen):
            right = rng.choice(chosen)
            directory = rng.randrange(100)
            folder = root / "nlvr2" / ("images/train/" + str(directory) if name == "train" else name)
            stem = f"{name}-{set_id}-0"
            for side, scene in enumerate((left, right)):
                _link(root / "coco" / scene.folder / scene.file_name, folder / f"{stem}-img{side}.png")
            statements = dict(zip((True, False), _nlvr_statements(rng, left, right)))
            for sentence_id, want in enumerate(rng.sample([True, False], 2)):
                sentence = statements[want]
                lines.append({"identifier": f"{stem}-{sentence_id}", "sentence": sentence, "label": str(want),
                              "directory": directory,
                              "left_url": f"https://demo.invalid/{left.image_id}.jpg",
                              "right_url": f"https://demo.invalid/{right.image_id}.jpg", "writer": "0",
                              "synset": left.groups[0].kind, "query": left.groups[0].kind,
                              "validation": {}, "extra_validations": {}})
        path = root / "nlvr2" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


def _hypotheses(rng: random.Random, scene: Scene) -> dict[str, str]:
    """One hypothesis per label. Entailment and contradiction share one template per image (a colour claim about a
    shape that is there, or a claim that a shape of some colour is there), true or false, so only the image tells
    them apart; neutral claims what no picture shows."""
    group = rng.choice(scene.groups)
    if rng.random() < 0.5:
        other = rng.choice([c for c in COLORS if c != group.color])
        subject = f"The {group.kind}s are" if group.count > 1 else f"The {group.kind} is"
        true, false = f"{subject} {group.color}.", f"{subject} {other}."
    else:
        facts = {(g.color, g.kind) for g in scene.groups}
        color, kind = rng.choice([(c, k) for c in COLORS for k in SHAPES if (c, k) not in facts])
        true, false = (f"There is a {group.color} {group.kind} in the picture.",
                       f"There is a {color} {kind} in the picture.")
    return {
        "entailment": true,
        "contradiction": false,
        "neutral": rng.choice([f"The {group.kind}s were drawn by a child.",
                               f"Someone is about to paint another {group.kind}.",
                               "The picture is part of a school project."]),
    }


def _write_snli_ve(root: Path, scenes: list[Scene], rng: random.Random) -> None:
    for split, name in zip(SPLITS, ("train", "dev", "test")):
        lines = []
        for scene in (s for s in scenes if s.split == split):
            _link(root / "coco" / scene.folder / scene.file_name,
                  root / "snli_ve" / "flickr30k-images" / f"{scene.image_id}.jpg")
            caption_index = rng.randrange(len(scene.captions))
            premise = scene.captions[caption_index]
            for label, hypothesis in _hypotheses(rng, scene).items():
                caption_id = f"{scene.image_id}.jpg#{caption_index}"
                lines.append({"Flickr30K_ID": str(scene.image_id), "annotator_labels": [label],
                              "captionID": caption_id, "gold_label": label,
                              "pairID": f"{caption_id}r1{label[0]}", "sentence1": premise,
                              "sentence1_binary_parse": _parse(premise), "sentence1_parse": _parse(premise),
                              "sentence2": hypothesis, "sentence2_binary_parse": _parse(hypothesis),
                              "sentence2_parse": _parse(hypothesis)})
        path = root / "snli_ve" / f"snli_ve_{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines), encoding="utf-8")


def _parse(sentence: str) -> str:
    return "( " + " ".join(_tokens(sentence)) + " )"


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def split_sizes(num_images: int) -> dict[str, int]:
    """Images per split: 1/8 each for val and test (at least one), the rest train."""
    if num_images < 3:
        raise ValueError(f"num_images={num_images}: the demo needs at least 3 images (one per split)")
    held_out = max(1, round(num_images / 8))
    return {"train": num_images - 2 * held_out, "val": held_out, "test": held_out}


def generate_demo(out: Path | str, seed: int = 0, num_images: int = 800, image_size: int = 256) -> DemoLayout:
    """Render ``num_images`` scenes and write them in every demo format under ``out``; deterministic in ``seed``."""
    root = Path(out)
    rng = random.Random(seed)
    scenes, image_id = [], 0
    for split, n in split_sizes(num_images).items():
        for _ in range(n):
            image_id += 1
            scenes.append(make_scene(rng, image_id, split, image_size))
    for scene in scenes:
        path = root / "coco" / scene.folder / scene.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        render(scene, seed).save(path, format="JPEG", quality=92)
    _write_karpathy(root, scenes)
    _write_albef(root, scenes)
    _write_vg(root, scenes)
    _write_vqa(root, scenes, random.Random(f"{seed}-vqa"))
    _write_refcoco(root, scenes)
    _write_nlvr2(root, scenes, random.Random(f"{seed}-nlvr2"))
    _write_snli_ve(root, scenes, random.Random(f"{seed}-snli"))
    inputs = shard_inputs(root)
    relative = {name: {**spec, "ann": [p.relative_to(root).as_posix() for p in spec["ann"]],
                       "images": spec["images"].relative_to(root).as_posix()} for name, spec in inputs.items()}
    _write_json(root / "shard_inputs.json", relative)  # paths relative to the demo folder
    return DemoLayout(root, scenes, inputs)


def shard_inputs(root: Path) -> dict[str, dict[str, Any]]:
    """``make_shards`` arguments (format → ann files, image root, extra flags) for a demo written to ``root``."""
    vqa = root / "vqa"
    return {
        "coco-karpathy": {"ann": [root / "coco" / "dataset_coco.json"], "images": root / "coco", "flags": []},
        "albef": {"ann": [root / "albef" / "retrieval_train.json"], "images": root / "coco", "flags": []},
        "vg-regions": {"ann": [root / "vg" / "region_descriptions.json", root / "vg" / "image_data.json"],
                       "images": root / "vg", "flags": []},
        "vqa-v2": {"ann": [vqa / "v2_OpenEnded_mscoco_train2014_questions.json",
                           vqa / "v2_mscoco_train2014_annotations.json"], "images": root / "coco", "flags": []},
        "refcoco": {"ann": [root / "refcoco"], "images": root / "coco",
                    "flags": ["--dataset", "refcoco", "--split-by", "unc"]},
        "nlvr2": {"ann": [root / "nlvr2" / "train.json"], "images": root / "nlvr2", "flags": []},
        "snli-ve": {"ann": [root / "snli_ve" / "snli_ve_train.jsonl"], "images": root / "snli_ve", "flags": []},
    }
