"""Checks of a task's shards before training: the samples must carry the fields the task reads."""
from __future__ import annotations

import itertools

from mplug_ds.config import ConfigError
from mplug_ds.data.reading import DataErrors, expand_urls, iter_samples
from mplug_ds.tasks.base import FinetuneTask

FIELD_HELP = {
    "grounding": "grounding reads texts[0] (the expression) and boxes[0]; write the shards with "
                 "tools/make_shards.py --format refcoco or --format transvg",
    "retrieval": "retrieval reads the image and its captions (texts) with image_id; write the shards with "
                 "tools/make_shards.py --format coco-karpathy or --format albef",
    "vqa": "vqa reads texts[0] (the question) and, for training, answers with answer_weights; write the shards "
           "with tools/make_shards.py --format vqa-v2 or --format mplug-vqa",
    "caption": "caption reads the image and its captions (texts); write the shards with tools/make_shards.py "
               "--format coco-karpathy or --format coco-captions",
    "nlvr2": "nlvr2 reads a left and a right image (.left.jpg/.right.jpg), texts[0] (the statement) and label; "
             "write the shards with tools/make_shards.py --format nlvr2",
    "ve": "ve reads the image, texts[0] (the hypothesis) and label; write the shards with "
          "tools/make_shards.py --format snli-ve",
    "video_retrieval": "video_retrieval reads the video and its captions (texts) with image_id (the video id); write "
                       "the shards with tools/make_shards.py --format msrvtt or --format video-text",
    "video_qa": "video_qa reads the video, its questions (texts) and one answer per question; write the shards with "
                "tools/make_shards.py --format msrvtt-qa, --format msvd-qa or --format video-qa",
    "video_caption": "video_caption reads the video and its captions (texts); write the shards with "
                     "tools/make_shards.py --format vatex, --format msrvtt or --format video-text",
}


def check_task_shards(task: FinetuneTask, shards: str, where: str, samples: int = 4) -> None:
    """Read the first ``samples`` samples of the first shard of ``shards``; raise ``ConfigError`` naming the shard,
    the sample key, the missing field and how to write suitable shards."""
    urls = expand_urls(shards)
    if not urls:
        raise ConfigError(f"{where}: '{shards}' matches no shard file")
    errors = DataErrors()
    read = list(itertools.islice(iter_samples(urls[0], errors), samples))
    if not read:
        raise ConfigError(f"{where}: no readable sample in {urls[0]} ({errors.corrupt_samples} corrupt, "
                          f"{errors.damaged_shards} damaged shards); check the file or rewrite the shards")
    for sample in read:
        missing = task.missing_fields(sample)
        if missing:
            raise ConfigError(f"{where}: sample '{sample.key}' of {urls[0]} has no {' / '.join(missing)} "
                              f"(a '{sample.task}' sample): {FIELD_HELP.get(task.name, '')}")
