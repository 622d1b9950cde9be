"""Convert a released mPLUG checkpoint (.pth: pre-trained, or fine-tuned VQA / caption / retrieval / grounding)
into an mplug_ds model directory (config.json + model_config.yaml + model.safetensors).

    python tools/convert_checkpoint.py mplug_base.pth converted/base --model mplug.en.base
    python tools/convert_checkpoint.py mplug_large_v2.pth converted/large --model mplug.en.large --image-size 336 --json

The output loads with pre-training's ``model.init_from=OUT``, fine-tuning's ``--pretrained OUT``,
``mplug_ds.load(OUT)`` and ``mplug_ds.models.hub.from_pretrained(OUT)``. Every key of the file is reported as
mapped, dropped (with the reason), missing (our keys the file lacks, e.g. the ITM head of a VQA release) or
unexpected. Missing keys keep their random initialisation; model.safetensors records them (metadata
``random_init``), so that fine-tuning warns and evaluation refuses a task that needs them. With --json, stdout
holds the JSON report only (everything else goes to stderr). The file is read with the restricted unpickler; a
file that needs code to load is refused unless --trust-checkpoint is given.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from mplug_ds.models.config import load_model_config
from mplug_ds.models.convert import convert_official, official_state_dict
from mplug_ds.models.hub import random_init_metadata, save_state
from mplug_ds.models.mplug import MPLUG
from mplug_ds.runtime import safe_load


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="the official .pth file")
    parser.add_argument("output", type=Path, help="output directory")
    parser.add_argument("--model", required=True, help="the model the checkpoint was trained as (mplug.en.base …)")
    parser.add_argument("--image-size", type=int, help="target resolution (positional embedding resized)")
    parser.add_argument("--keep-momentum", action="store_true",
                        help="keep the momentum copies for the teacher (written as momentum.safetensors)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (only that, on stdout) instead of the text report")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a file that needs full unpickling (it can run code); only for files you trust")
    parser.add_argument("overrides", nargs="*", help="model config overrides, key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    out = sys.stdout
    # With --json nothing but the report may reach stdout: whatever a library prints goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        report = convert(args)
    if report is None:
        return 1
    if args.json:
        print(json.dumps(report.to_json(), indent=2), file=out)
    return 0


def convert(args: argparse.Namespace):
    """Convert and write the output directory; the report, or ``None`` after printing why it failed."""
    overrides = list(args.overrides) + ([f"vision.image_size={args.image_size}"] if args.image_size else [])
    try:
        cfg = load_model_config(args.model, overrides)
        if not args.input.is_file():
            raise FileNotFoundError(f"{args.input} does not exist")
        state = official_state_dict(safe_load.load(args.input, args.trust_checkpoint), str(args.input))
        online, teacher, report = convert_official(state, cfg, args.keep_momentum)
    except (FileNotFoundError, ValueError, safe_load.UntrustedCheckpointError) as err:
        print(f"convert failed: {err}", file=sys.stderr)
        return None
    del state
    missing = [k for k in report.missing if not k.startswith("momentum:")]
    if missing or (args.keep_momentum and len(missing) < len(report.missing)):
        torch.manual_seed(0)
        fresh = MPLUG(cfg)
        online.update({k: v for k, v in fresh.state_dict().items() if k in missing})
        if args.keep_momentum:  # teacher parts the file lacks start as copies of the online weights (as mPLUG does)
            teacher_keys = MPLUG(cfg, teacher=True).state_dict().keys()
            teacher.update({k: online[k] for k in teacher_keys if k not in teacher})
        del fresh
    extra = {"momentum": teacher} if args.keep_momentum else None
    save_state(online, cfg, args.output, {"source": str(args.input), **random_init_metadata(missing)}, extra)
    if not args.json:
        print("\n".join(report.lines()))
        print(f"wrote {args.output} (model '{cfg.name}', image size {cfg.vision.image_size})")
    if missing:
        modules = sorted({k.split(".")[0] for k in missing})
        print(f"warning: {len(missing)} tensors ({', '.join(modules)}) are not in {args.input} and keep their random "
              f"initialisation; {args.output / 'model.safetensors'} records them: fine-tuning a task that needs them "
              "warns, evaluating or predicting with it is refused", file=sys.stderr)
    return report


if __name__ == "__main__":
    sys.exit(main())
