"""Tiny real task shards and exports for the fine-tuning tests (written by the project's own shard layout)."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from mplug_ds.config import to_dict
from mplug_ds.data.sample import Sample
from mplug_ds.models.config import load_model_config
from mplug_ds.models.mplug import build_model
from tests.data.shard_utils import write_manifest, write_shard

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220)}


def _scene(seed: int, width: int, height: int) -> tuple[bytes, str, list[float]]:
    rng = random.Random(seed)
    colour = rng.choice(list(COLOURS))
    w, h = rng.randint(8, width // 2), rng.randint(8, height // 2)
    x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
    image = Image.new("RGB", (width, height), (200, 200, 200))
    ImageDraw.Draw(image).rectangle((x0, y0, x0 + w - 1, y0 + h - 1), fill=COLOURS[colour])
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)
    side = "left" if x0 + w / 2 < width / 2 else "right"
    return buf.getvalue(), f"the {colour} box on the {side}", [float(x0), float(y0), float(x0 + w), float(y0 + h)]


def write_grounding_shards(directory: Path, prefix: str, counts: list[int], splits: list[str], seed: int = 0) -> str:
    """Shards of grounding samples (one coloured box per image, sizes varying), ``counts[i]`` in shard i."""
    n = 0
    names = {}
    for shard, count in enumerate(counts):
        samples = []
        for _ in range(count):
            jpeg, text, box = _scene(seed * 10_000 + n, 64 + 8 * (n % 3), 48 + 16 * (n % 2))
            samples.append(Sample(key=f"{prefix}_{n:05d}", task="grounding", image=jpeg, texts=[text], boxes=[box],
                                  image_id=str(n), split=splits[n % len(splits)]))
            n += 1
        path = write_shard(directory / f"{prefix}-{shard:06d}.tar", samples)
        names[path.name] = count
    write_manifest(directory, names)
    return f"{directory}/{prefix}-{{{0:06d}..{len(counts) - 1:06d}}}.tar"


def write_retrieval_shards(directory: Path, prefix: str, counts: list[int], seed: int = 0) -> str:
    """Shards of caption samples with image ids (1–3 captions each, derived from the drawn box)."""
    n = 0
    names = {}
    for shard, count in enumerate(counts):
        samples = []
        for _ in range(count):
            jpeg, text, _ = _scene(seed * 10_000 + n, 64, 64)
            captions = [text, f"a picture of {text}", f"{text} number {n}"][: 1 + n % 3]
            samples.append(Sample(key=f"{prefix}_{n:05d}", task="caption", image=jpeg, texts=captions,
                                  image_id=f"img_{n}"))
            n += 1
        path = write_shard(directory / f"{prefix}-{shard:06d}.tar", samples)
        names[path.name] = count
    write_manifest(directory, names)
    return f"{directory}/{prefix}-{{{0:06d}..{len(counts) - 1:06d}}}.tar"


def write_vqa_shards(directory: Path, prefix: str, counts: list[int], seed: int = 0) -> str:
    """Shards of VQA v2-style samples (a question about the drawn box, ten human answers, weights, answer type)."""
    n = 0
    names = {}
    for shard, count in enumerate(counts):
        samples = []
        for _ in range(count):
            jpeg, text, _ = _scene(seed * 10_000 + n, 64, 64)
            colour, side = text.split()[1], text.split()[-1]
            question, answer, kind = [("what colour is the box?", colour, "other"),
                                      ("is the box on the left?", "yes" if side == "left" else "no", "yes/no"),
                                      ("how many boxes are there?", "1", "number")][n % 3]
            agree = 7 + n % 4  # 7–10 of the ten annotators give the answer, the others an alternative
            humans = [answer] * agree + ["one" if kind == "number" else "blue"] * (10 - agree)
            answers = list(dict.fromkeys(humans))
            samples.append(Sample(key=f"{prefix}_{n:05d}", task="vqa", image=jpeg, texts=[question], answers=answers,
                                  answer_weights=[humans.count(a) / 10 for a in answers], image_id=str(n),
                                  extra={"question_id": 1000 + n, "all_answers": humans, "answer_type": kind}))
            n += 1
        path = write_shard(directory / f"{prefix}-{shard:06d}.tar", samples)
        names[path.name] = count
    write_manifest(directory, names)
    return f"{directory}/{prefix}-{{{0:06d}..{len(counts) - 1:06d}}}.tar"


def write_export(directory: Path, model_name: str = "tiny", overrides: tuple[str, ...] = (), seed: int = 0) -> Path:
    """An export directory (model.safetensors + model_config.yaml) of a freshly initialised model."""
    torch.manual_seed(seed)
    cfg = load_model_config(model_name, list(overrides))
    model = build_model(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "model_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return directory


def shard_overrides(train: str, eval_shards: str) -> list[str]:
    """``key=value`` overrides pointing a task run at shards with a manifest (and at the ``tiny`` model, which
    ``write_export`` writes by default)."""
    manifest = str(Path(train.split("{")[0]).parent / "manifest.json")
    source = json.dumps([{"name": "train", "shards": train, "manifest": manifest}])
    return ["data.source=shards", f"data.pipeline.sources={source}", f"data.eval_shards={eval_shards}",
            "data.pipeline.num_workers=1", "data.pipeline.shuffle_buffer=8", "data.pipeline.shuffle_initial=4",
            "model.name=tiny"]


def assert_predictions_picture(output: str, path: Path) -> None:
    """The run printed ``predictions: <path>`` and wrote a real PNG there (the evaluated samples, drawn)."""
    assert f"predictions: {path}" in output, output[-2000:]
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 300 and image.height >= 300, (image.format, image.size)
