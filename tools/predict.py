"""Ask a trained model about images: print its captions, answers, boxes, rankings or labels, and draw them.

    python tools/predict.py outputs/caption_demo/export --task caption photo.jpg other.jpg
    python tools/predict.py outputs/vqa_demo/export --task vqa photo.jpg --question "what colour is the circle?"
    python tools/predict.py outputs/grounding_demo/export --task grounding photo.jpg --text "the red square"
    python tools/predict.py outputs/retrieval_demo/export --task retrieval a.jpg b.jpg --text "a red circle" \\
        --text "two blue squares"
    python tools/predict.py outputs/nlvr2_demo/export --task nlvr2 left.jpg right.jpg --text "the left image ..."
    python tools/predict.py outputs/ve_demo/export --task ve photo.jpg --text "there is a circle" --json

    python tools/predict.py converted/vqa_base --task vqa photo.jpg --question "what is it?" --config vqa_base

CHECKPOINT: an export (tools/export_checkpoint.py), a converted release (tools/convert_checkpoint.py) or a run
directory. Preprocessing and decoding are the evaluation's, with the task options and text lengths of the run
that made the checkpoint, or of --config (and --set key=value) (mplug_ds.load). A --question or --text given once
applies to every image (nlvr2: every left/right pair); retrieval ranks all --text against all images. The picture
is the evaluation's (up to 8 inputs) at --out. With --json, stdout holds only the JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import mplug_ds  # light: the model and the predictor are imported on first use of mplug_ds.load

TASK_NAMES = ("caption", "vqa", "grounding", "retrieval", "nlvr2", "ve")
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="export, converted release or run directory")
    parser.add_argument("--task", required=True, choices=TASK_NAMES, help="what to ask")
    parser.add_argument("images", nargs="+", help="image files (nlvr2: left and right of each pair, in turn)")
    parser.add_argument("--question", action="append", default=[], help="vqa: the question (once, or per image)")
    parser.add_argument("--text", action="append", default=[],
                        help="grounding: the expression; nlvr2: the statement; ve: the hypothesis (once, or per "
                        "image / pair); retrieval: a text to rank (repeat)")
    parser.add_argument("--config", help="fine-tuning config to predict with: a name (vqa_base …) or a YAML path "
                        "(default: the config of the run that made the checkpoint)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of that config, e.g. --set task.options.num_beams=3 (repeat)")
    parser.add_argument("--out", default="predictions.png", help="the picture (PNG; default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (only that, on stdout)")
    parser.add_argument("--batch-size", type=int, help="inputs per forward (default: the run's eval.batch_size)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu … (default: the GPU when there is one)")
    return parser


def inputs(args: argparse.Namespace) -> tuple[list, list[str] | None]:
    """The images (nlvr2: pairs) and one text per input (retrieval: the texts to rank; caption: none)."""
    images: list = list(args.images)
    if args.task == "nlvr2":
        if len(images) % 2:
            raise ValueError(f"nlvr2 takes images in (left, right) pairs: got {len(images)} images")
        images = [(images[i], images[i + 1]) for i in range(0, len(images), 2)]
    texts = args.question if args.task == "vqa" else args.text
    flag = "--question" if args.task == "vqa" else "--text"
    if args.task == "caption":
        if texts:
            raise ValueError("caption takes no --text or --question")
        return images, None
    if not texts:
        raise ValueError(f"--task {args.task} needs {flag}")
    if args.task == "retrieval":
        return images, texts
    if len(texts) == 1:
        texts = texts * len(images)
    if len(texts) != len(images):
        raise ValueError(f"{len(images)} inputs but {len(texts)} {flag}: give one, or one per input")
    return images, texts


def lines(task: str, names: list[str], texts: list[str] | None, predictions: list[dict]) -> list[str]:
    """The predictions as text, one input per line (retrieval: each image with its best texts)."""
    out = []
    for i, (name, p) in enumerate(zip(names, predictions)):
        if task == "caption":
            out.append(f"{name}: {p['caption']}")
        elif task == "retrieval":
            out.append(f"{name}: " + "; ".join(f"{text} ({score:.2f})" for text, score, _ in p["texts"]))
        elif task == "grounding":
            out.append(f"{name}: {texts[i]} -> [{', '.join(f'{v:.1f}' for v in p['pred_box'])}]")
        elif task == "vqa":
            out.append(f"{name}: {texts[i]} -> {p['answer']}")
        else:
            out.append(f"{name}: {texts[i]} -> {p['answer']} (p {max(p['probs']):.2f})")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    out = sys.stdout
    # With --json nothing but the JSON may reach stdout: library logs (DeepSpeed logs to stdout) go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        try:
            images, texts = inputs(args)
            predictor = mplug_ds.load(args.checkpoint, args.config, args.set, args.device, args.batch_size)
            samples, predictions = predictor.predict(args.task, images, texts)
            picture = predictor.draw(args.task, samples, predictions, args.out)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USAGE
    names = [" + ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in images]
    if args.json:
        record = {"task": args.task, "checkpoint": args.checkpoint, "picture": str(picture) if picture else None,
                  "predictions": [{"input": name, **p} for name, p in zip(names, predictions)]}
        print(json.dumps(record, indent=2), file=out)
    else:
        print("\n".join(lines(args.task, names, texts, predictions)), file=out)
        print(f"picture: {picture}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
