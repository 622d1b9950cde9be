"""The demo's fine-tuning data: task shards cut from the procedural demo world, prepared once into a cache.

``<cache_dir>/world-<fingerprint>/shards/`` already holds the demo's caption shards (``train``, ``test``: COCO-Karpathy format), which
are also the retrieval and caption tasks' train and evaluation sets (one sample per image with all its captions and
image id). Grounding gets ``refcoco/train`` and ``refcoco/eval`` (val, testA and testB expressions, each labelled
with its split), read by the refer-toolkit reader from the same world; VQA gets ``vqa/train`` (train2014 questions)
and ``vqa/eval`` (val2014: the held-out images' questions), read by the VQA v2 reader; NLVR2 and SNLI-VE get
``nlvr2/`` and ``ve/`` (``train``; ``eval`` = dev and test, each sample labelled with its split) from the world's
official-format files. The video tasks get ``video_retrieval-<fp>/``, ``video_qa-<fp>/`` and ``video_caption-<fp>/``
(``train``; ``eval`` = the test split), read by the MSR-VTT, ALPRO QA and VATEX readers from the demo video world
(``mplug_ds.data.demo_video``; ``<fp>`` fingerprints its generator, as the world folder does the image world's).
Preparation happens in a temporary directory that is renamed into place, so an interrupted first run never leaves
half-written shards behind.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from mplug_ds.data import demo, demo_video
from mplug_ds.data.demo import generate_demo
from mplug_ds.data.demo_video import generate_video_demo, video_shard_inputs
from mplug_ds.data.formats import ReaderArgs, read_format
from mplug_ds.data.shards import ShardOptions, write_shards
from mplug_ds.data.demo_shards import DEMO_IMAGE_SIZE, DEMO_IMAGES, DEMO_SEED, prepare_demo_shards, world_dir

DEMO_CLIPS = 960


@dataclass(frozen=True)
class DemoTaskFormat:
    """How a task's demo shards are cut from the raw demo world: its folder, reader and splits."""

    folder: str
    format_name: str
    reader_args: Callable[[Path], ReaderArgs]  # raw demo folder → reader arguments
    splits: dict[str, list[str]]  # shard folder (train / eval) → the reader's splits it holds
    video: bool = False  # cut from the demo video world (else the image world)


@lru_cache(maxsize=1)
def video_fingerprint() -> str:
    """Identifies the demo video world: its generator's and renderer's source and its settings."""
    digest = hashlib.sha256(Path(demo_video.__file__).read_bytes() + Path(demo.__file__).read_bytes())
    digest.update(f"clips={DEMO_CLIPS} seed={DEMO_SEED}".encode())
    return digest.hexdigest()[:12]


def _video_args(name: str) -> Callable[[Path], ReaderArgs]:
    def args(raw: Path) -> ReaderArgs:
        spec = video_shard_inputs(raw)[name]
        return ReaderArgs(ann=spec["ann"], images=spec["images"])
    return args


VQA_FILES = ("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json",
             "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json")
TASK_FORMATS = {
    "grounding": DemoTaskFormat("refcoco", "refcoco", lambda raw: ReaderArgs(
        ann=[raw / "refcoco"], images=raw / "coco", dataset="refcoco", split_by="unc"),
        {"train": ["train"], "eval": ["val", "testA", "testB"]}),
    # val2014 holds the demo's held-out val and test images
    "vqa": DemoTaskFormat("vqa", "vqa-v2", lambda raw: ReaderArgs(
        ann=[raw / "vqa" / f for f in VQA_FILES], images=raw / "coco"), {"train": ["train2014"], "eval": ["val2014"]}),
    "nlvr2": DemoTaskFormat("nlvr2", "nlvr2", lambda raw: ReaderArgs(
        ann=[raw / "nlvr2" / f for f in ("train.json", "dev.json", "test1.json")], images=raw / "nlvr2"),
        {"train": ["train"], "eval": ["dev", "test1"]}),
    "ve": DemoTaskFormat("ve", "snli-ve", lambda raw: ReaderArgs(
        ann=[raw / "snli_ve" / f"snli_ve_{s}.jsonl" for s in ("train", "dev", "test")], images=raw / "snli_ve"),
        {"train": ["train"], "eval": ["dev", "test"]}),
    "video_retrieval": DemoTaskFormat("video_retrieval", "msrvtt", _video_args("msrvtt"),
                                      {"train": ["train"], "eval": ["test"]}, video=True),
    "video_qa": DemoTaskFormat("video_qa", "video-qa", _video_args("video-qa"),
                               {"train": ["train"], "eval": ["test"]}, video=True),
    "video_caption": DemoTaskFormat("video_caption", "vatex", _video_args("vatex"),
                                    {"train": ["train"], "eval": ["test"]}, video=True),
}


@dataclass(frozen=True)
class TaskShards:
    """Training shards (with their manifest) and evaluation shards of one task."""

    train: str
    train_manifest: str
    eval: str


def _split_shards(split_dir: Path) -> str:
    return str(split_dir / "*.tar")


def prepare_demo_task_shards(cache_dir: Path, task: str) -> TaskShards:
    """Shards of ``task`` (``grounding`` | ``retrieval`` | ``caption`` | ``vqa`` | ``nlvr2`` | ``ve``) from the demo
    world, written on first use."""
    cache_dir = Path(cache_dir).expanduser()
    if task in ("retrieval", "caption"):
        shards = prepare_demo_shards(cache_dir)
        return TaskShards(shards.train, str(world_dir(cache_dir) / "shards" / "train" / "manifest.json"), shards.test)
    if task not in TASK_FORMATS:
        known = ", ".join(sorted([*TASK_FORMATS, "caption", "retrieval"]))
        raise ValueError(f"the demo has no data for task '{task}' ({known})")
    spec = TASK_FORMATS[task]
    folder = f"{spec.folder}-{video_fingerprint()}" if spec.video else spec.folder
    root = world_dir(cache_dir) / "shards" / folder
    if not all((root / split / "manifest.json").is_file() for split in spec.splits):
        root.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".preparing-{folder}-"))
        try:
            raw = work / "raw"
            if spec.video:
                generate_video_demo(raw, seed=DEMO_SEED, num_clips=DEMO_CLIPS)
            else:
                generate_demo(raw, seed=DEMO_SEED, num_images=DEMO_IMAGES, image_size=DEMO_IMAGE_SIZE)
            args = spec.reader_args(raw)
            for name, chosen in spec.splits.items():
                options = ShardOptions(out=work / folder / name, prefix=f"{folder}-{name}",
                                       format_name=spec.format_name, shard_size=200 if spec.video else 1000,
                                       inputs=[str(a) for a in args.ann], progress=False)
                write_shards(read_format(spec.format_name, args, chosen), options)
            if not root.exists():
                (work / folder).rename(root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return TaskShards(_split_shards(root / "train"), str(root / "train" / "manifest.json"),
                      _split_shards(root / "eval"))
