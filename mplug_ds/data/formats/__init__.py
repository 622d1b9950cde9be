"""One reader per on-disk annotation format, each turning its files into canonical ``Sample``s.

``FORMATS[name](ReaderArgs(...))`` yields ``Sample`` objects (image given as a path, or bytes for img2dataset; a
video as a path) and ``Skip`` records for rows it had to reject; an unreadable annotation file raises
``AnnotationError``. Readers do not open images or videos: the shard writer loads, checks and (optionally) resizes
them, clips boxes to the image and drops empty texts. ``read_format`` adds ``--split`` selection on top.
"""
from __future__ import annotations

from typing import Iterator

from mplug_ds.data.formats.albef import read_albef
from mplug_ds.data.formats.coco import read_coco_captions, read_coco_karpathy
from mplug_ds.data.formats.common import AnnotationError, ReaderArgs, ReaderFn, Skip
from mplug_ds.data.formats.img2dataset import read_img2dataset
from mplug_ds.data.formats.msrvtt import read_msrvtt
from mplug_ds.data.formats.nlvr2 import read_nlvr2
from mplug_ds.data.formats.refcoco import read_refcoco
from mplug_ds.data.formats.snli_ve import read_snli_ve
from mplug_ds.data.formats.transvg import read_transvg
from mplug_ds.data.formats.vatex import read_vatex
from mplug_ds.data.formats.vg import read_vg_objects, read_vg_regions
from mplug_ds.data.formats.video_qa import read_msrvtt_qa, read_msvd_qa, read_video_qa
from mplug_ds.data.formats.video_text import read_video_text
from mplug_ds.data.formats.vqa import read_mplug_vqa, read_vqa_v2
from mplug_ds.data.formats.xvlm import read_xvlm_regions
from mplug_ds.data.sample import Sample

FORMATS: dict[str, ReaderFn] = {
    "albef": read_albef,
    "coco-captions": read_coco_captions,
    "coco-karpathy": read_coco_karpathy,
    "vg-regions": read_vg_regions,
    "vg-objects": read_vg_objects,
    "xvlm-regions": read_xvlm_regions,
    "img2dataset": read_img2dataset,
    "vqa-v2": read_vqa_v2,
    "mplug-vqa": read_mplug_vqa,
    "refcoco": read_refcoco,
    "transvg": read_transvg,
    "nlvr2": read_nlvr2,
    "snli-ve": read_snli_ve,
    "msrvtt": read_msrvtt,
    "video-text": read_video_text,
    "msrvtt-qa": read_msrvtt_qa,
    "msvd-qa": read_msvd_qa,
    "video-qa": read_video_qa,
    "vatex": read_vatex,
}

__all__ = ["FORMATS", "AnnotationError", "ReaderArgs", "ReaderFn", "Skip", "read_format"]


def read_format(name: str, args: ReaderArgs, splits: list[str] | None = None) -> Iterator[Sample | Skip]:
    """Run reader ``name``; with ``splits``, keep only samples of those splits.

    Samples whose format carries no split are kept, labelled with the split when exactly one is given
    (e.g. ``--split train`` on an ALBEF file).
    """
    if name not in FORMATS:
        raise KeyError(f"unknown format {name!r}; choose one of: {', '.join(FORMATS)}")
    for item in FORMATS[name](args):
        if isinstance(item, Sample) and splits:
            if item.split is None:
                item.split = splits[0] if len(splits) == 1 else None
            elif item.split not in splits:
                continue
        yield item
