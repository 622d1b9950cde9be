r"""Convert an annotation format + image (or video) folder into WebDataset shards (see mplug_ds/data/shards.py).

Examples:
  python tools/make_shards.py --format coco-karpathy --ann dataset_coco.json --images coco/ \
      --out shards/coco --split train,restval
  python tools/make_shards.py --format vqa-v2 --ann v2_OpenEnded_mscoco_val2014_questions.json \
      v2_mscoco_val2014_annotations.json --images coco/ --out shards/vqa_val
  python tools/make_shards.py --format refcoco --ann refer/data --dataset refcoco+ --split-by unc \
      --images coco/ --out shards/refcoco+ --split val
  python tools/make_shards.py --format msrvtt --ann MSRVTT_data.json --images msrvtt/videos/all \
      --split-file train=MSRVTT_train.9k.csv --split-file test=MSRVTT_JSFUSION_test.csv --out shards/msrvtt_1ka \
      --split test
  python tools/make_shards.py --format msvd-qa --ann test_qa.json youtube_mapping.txt --images YouTubeClips \
      --out shards/msvd_qa_test --resize 320
Exit status: 0 when samples were written, 1 when no valid sample was found, 2 when an annotation file cannot be read.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mplug_ds.data.formats import FORMATS, AnnotationError, ReaderArgs, read_format
from mplug_ds.data.shards import ShardOptions, write_shards

FORMAT_HELP = """formats and what --ann takes:
  albef          ALBEF/mPLUG caption or retrieval JSON arrays ({"image", "caption"}); rows merged per image
  coco-captions  official captions_<split><year>.json (split taken from the file name)
  coco-karpathy  Karpathy dataset_coco.json / dataset_flickr30k.json, or mPLUG's array of the same entries
  vg-regions     VG region_descriptions.json [+ image_data.json]
  vg-objects     VG objects.json and/or attributes.json [+ image_data.json]
  xvlm-regions   X-VLM / TiMix region JSONs (vg_object.json, vg_region.json, coco_object.json)
  img2dataset    img2dataset shard tars (00000.tar ...) or folders of the 'files' output; --images not needed
  vqa-v2         official *_questions.json [+ *_annotations.json]
  mplug-vqa      mPLUG/ALBEF vqa_*.json rows; --root vg=DIR --root gqa=DIR for non-COCO images
  refcoco        refs(<split_by>).p + instances.json, or the refer data folder with --dataset/--split-by
  transvg        TransVG <dataset>_<split>.pth index files (dataset from the name, or --dataset)
  nlvr2          official JSON-lines train.json/dev.json/test1.json, or ALBEF nlvr arrays
  snli-ve        snli_ve_<split>.jsonl, or ALBEF ve arrays
videos (--images is the video folder; one sample per video, its bytes stored as they are):
  msrvtt         MSRVTT_data.json or train_val_videodatainfo.json / test_videodatainfo.json; splits train/validate/
                 test, or the published lists with --split-file (9k / 7k train CSVs, 1k-A JSFusion test CSV)
  video-text     BLIP / ALPRO jsonl {clip_name, caption} or LAVIS / VindLU arrays {video, caption}
  msrvtt-qa      original {train,val,test}_qa.json (video_id N = video<N>.mp4)
  msvd-qa        original {train,val,test}_qa.json + youtube_mapping.txt (vid<N> = <clip>.avi)
  video-qa       ALPRO / mPLUG jsonl {question, answer, video_id, answer_type} or LAVIS arrays {video, ...}
  vatex          vatex_training_v1.0.json / vatex_validation_v1.0.json / vatex_public_test_english_v1.1.json
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    summary, examples = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(description=summary, epilog=FORMAT_HELP + "\n" + examples,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=list(FORMATS), metavar="NAME",
                        help="annotation format, one of the names listed below")
    parser.add_argument("--ann", required=True, nargs="+", type=Path, help="annotation file(s) (or folder, see below)")
    parser.add_argument("--images", type=Path, help="image (or video) root the annotation paths are relative to")
    parser.add_argument("--out", required=True, type=Path, help="output directory for shards and manifest.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--resize", type=int, metavar="MAX_SIDE",
                        help="shrink images so the longer side is at most MAX_SIDE (boxes scaled to match); videos "
                             "are re-encoded to H.264 MP4 with frames of at most MAX_SIDE")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="image-loading processes (0 = none; default min(4, CPUs))")
    parser.add_argument("--split", help="comma-separated splits to keep (e.g. train,restval); formats without "
                                        "splits get this name when it is a single one")
    parser.add_argument("--prefix", help="shard name prefix (default <format>[-<split>])")
    parser.add_argument("--dataset", help="refcoco: refcoco | refcoco+ | refcocog; transvg: unc | unc+ | gref | "
                                          "gref_umd | referit | flickr (when not in the file name)")
    parser.add_argument("--split-by", help="refcoco: unc | google | umd (which refs(<split_by>).p to read)")
    parser.add_argument("--root", action="append", default=[], metavar="NAME=DIR",
                        help="extra image root by name (mplug-vqa: vg=DIR, gqa=DIR); repeatable")
    parser.add_argument("--split-file", action="append", default=[], metavar="NAME=FILE",
                        help="msrvtt: the videos of split NAME (a CSV with video_id [and sentence] or a text file of "
                             "ids); repeatable")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be at least 1")
    if args.resize is not None and args.resize < 1:
        parser.error("--resize must be a positive number of pixels")
    if args.workers < 0:
        parser.error("--workers must be 0 or more")
    for item in args.root:
        if "=" not in item:
            parser.error(f"--root {item!r}: expected NAME=DIR, e.g. --root vg=/data/visual_genome")
    for item in args.split_file:
        if "=" not in item:
            parser.error(f"--split-file {item!r}: expected NAME=FILE, e.g. --split-file train=MSRVTT_train.9k.csv")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; return the process exit status."""
    args = parse_args(argv)
    splits = [s for s in args.split.split(",") if s] if args.split else None
    prefix = args.prefix or "-".join([args.format, *(["_".join(splits)] if splits else [])])
    reader_args = ReaderArgs(ann=args.ann, images=args.images, dataset=args.dataset, split_by=args.split_by,
                             roots={k: Path(v) for k, v in (item.split("=", 1) for item in args.root)},
                             split_files={k: Path(v) for k, v in (item.split("=", 1) for item in args.split_file)})
    options = ShardOptions(out=args.out, prefix=prefix, format_name=args.format, shard_size=args.shard_size,
                           resize=args.resize, workers=args.workers, inputs=[str(p) for p in args.ann],
                           progress=not args.quiet)
    try:
        manifest = write_shards(read_format(args.format, reader_args, splits), options)
    except AnnotationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if manifest["total_samples"] == 0:
        print(f"error: no valid {args.format} samples found in {', '.join(map(str, args.ann))}"
              f"{f' for split {args.split}' if splits else ''}; {manifest['skipped']} inputs were rejected, "
              f"reasons in {args.out / 'skipped.jsonl'}. Check --format, --images and --split.", file=sys.stderr)
        return 1
    print(f"wrote {manifest['total_samples']} samples in {len(manifest['shards'])} shards to {args.out} "
          f"({manifest['skipped']} skipped, see skipped.jsonl)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
