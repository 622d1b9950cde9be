"""Picture what TiMix does to a batch: originals, patch relevance to the caption, chosen windows, mixed images.

    python tools/timix_viz.py                                   # newest checkpoint of the demo_timix run, demo data
    python tools/timix_viz.py outputs/demo_timix --shards '/data/coco/{000000..000009}.tar' --images 6
    python tools/timix_viz.py exported/ --out timix.png         # a tools/export_checkpoint.py directory

One row per image: the image with its caption; the patch predictor's probability that each patch is relevant to
that caption; the image with its least relevant window (red, replaced); its partner with the most relevant window
(green, pasted into the red one); the mixed image with the source share λ. Writes a PNG and prints its path.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DEFAULT_RUN = "outputs/demo_timix"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default=DEFAULT_RUN,
                        help="run directory, checkpoints/ or step_* directory, or an export directory "
                             f"(default: {DEFAULT_RUN}, written by launch/pretrain.py --config demo_timix)")
    parser.add_argument("--shards", help="caption shards (brace pattern or '::' list); default: the demo test split")
    parser.add_argument("--demo-cache", default=None,
                        help="where the demo shards are (or go); default: the run's data.cache_dir")
    parser.add_argument("--images", type=int, default=6, help="images in the batch (rows of the grid)")
    parser.add_argument("--skip", type=int, default=0, help="start after this many samples of the shards")
    parser.add_argument("--seed", type=int, default=0, help="seed for window sides and pairing")
    parser.add_argument("--side", type=int, default=None, help="window side in patches for every image (default: "
                        "drawn as in training, from timix.min/max_side_ratio)")
    parser.add_argument("--out", default=None, help="PNG path (default: <checkpoint>/timix_viz.png)")
    return parser.parse_args(argv)


def load_model_and_timix(checkpoint: Path):
    """The online model (with its patch predictor), the run's TiMix settings (defaults for an export) and the
    run's saved config (``{}`` for an export)."""
    from mplug_ds.config import from_dict
    from mplug_ds.engine.checkpoint import resolve_resume
    from mplug_ds.engine.export import consolidate, find_run_model_config, load_exported
    from mplug_ds.models.config import load_model_config
    from mplug_ds.models.mplug import build_model
    from mplug_ds.objectives.timix import TimixConfig

    if (checkpoint / "model.safetensors").is_file():
        model, run_config = load_exported(checkpoint), None
    else:
        tag_dir = resolve_resume(str(checkpoint), checkpoint)
        if tag_dir is None:
            raise FileNotFoundError(f"{checkpoint}: no complete checkpoint (train first: deepspeed "
                                    "launch/pretrain.py --config demo_timix)")
        model_cfg = load_model_config(find_run_model_config(tag_dir))
        model = build_model(model_cfg)
        model.load_state_dict(consolidate(tag_dir, model_cfg))
        run_config = tag_dir.parent.parent / "config.yaml"
    if model.patch_predictor is None:
        raise ValueError(f"{checkpoint}: the model has no patch predictor (it was not trained with TiMix)")
    saved = {}
    if run_config is not None and run_config.is_file():
        import yaml

        saved = yaml.safe_load(run_config.read_text()) or {}
    timix = from_dict(TimixConfig, {**(saved.get("timix") or {}), "enabled": True}, "timix")
    return model.eval(), timix, saved


def load_batch(pattern: str, count: int, skip: int, image_size: int, max_len: int = 30):
    """Up to ``count`` (image, first caption) pairs from caption shards, test-time resized."""
    from mplug_ds.data.collate import tokenize
    from mplug_ds.data.reading import iter_samples
    from mplug_ds.data.transforms import TestTransform, pre_caption

    transform, images, captions = TestTransform(image_size), [], []
    for i, sample in enumerate(iter_samples(pattern)):
        caption = next((c for c in (pre_caption(t) for t in sample.texts) if c), None)
        if i < skip or sample.image is None or caption is None:
            continue
        images.append(transform(sample.image))
        captions.append(caption)
        if len(images) == count:
            break
    if len(images) < 2:
        raise ValueError(f"{pattern}: fewer than 2 readable captioned images")
    ids, mask = tokenize(captions, max_len)
    return torch.stack(images), ids, mask, captions


@torch.no_grad()
def timix_batch(model, timix, images, ids, mask, seed: int, side: int | None = None):
    """Relevance, mix plan, mixed images and source shares for one batch (what a training step would do)."""
    from mplug_ds.objectives.pretrain import PretrainConfig
    from mplug_ds.objectives.timix import TimixPretrainModel
    from mplug_ds.objectives.timix_mixing import draw_partners, mix_pixels, plan_mix, source_share, standardize

    objective = TimixPretrainModel(model, PretrainConfig(distill=False), timix)
    _, tapped = model.encode_image_tapped(images)
    probs = objective.relevance(tapped, model.encode_text(ids, mask))
    torch.manual_seed(seed)
    if side is None:
        plan = objective.draw_plan(probs)
    else:
        sides = torch.full((probs.shape[0],), side)
        plan = plan_mix(standardize(probs.log()), sides, draw_partners(probs.shape[0], timix.pairing))
    mixed = mix_pixels(images, plan, model.cfg.vision.patch_size)
    return probs, plan, mixed, source_share(plan, timix.label_mode, probs)


def draw(images, captions, probs, plan, mixed, share, patch: int, out: Path) -> None:
    """The PNG grid: 5 columns per image row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from mplug_ds.data.transforms import CLIP_MEAN, CLIP_STD

    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)

    def rgb(x):
        return (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()

    b, n = probs.shape
    grid = int(n ** 0.5)
    fig, axes = plt.subplots(b, 5, figsize=(16, 3.3 * b), squeeze=False)
    for i in range(b):
        j, k = int(plan.partners[i]), int(plan.sides[i])
        ax = axes[i]
        ax[0].imshow(rgb(images[i]))
        ax[0].set_title("\n".join(_wrap(captions[i], 34)), fontsize=8)
        ax[1].imshow(rgb(images[i]))
        heat = ax[1].imshow(probs[i].view(grid, grid).numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=1,
                            extent=(0, images.shape[-1], images.shape[-1], 0), interpolation="nearest")
        ax[1].set_title("p(patch relevant to caption)", fontsize=8)
        fig.colorbar(heat, ax=ax[1], fraction=0.046)
        ax[2].imshow(rgb(images[i]))
        ax[3].imshow(rgb(images[j]))
        if k:
            (tr, tc), (sr, sc) = plan.target[i].tolist(), plan.source[i].tolist()
            for a, (r, c), colour in ((ax[2], (tr, tc), "red"), (ax[3], (sr, sc), "lime")):
                a.add_patch(Rectangle((c * patch - 0.5, r * patch - 0.5), k * patch, k * patch, fill=False,
                                      edgecolor=colour, linewidth=2.5))
            ax[2].set_title(f"least relevant {k}×{k} window (replaced)", fontsize=8)
            ax[3].set_title(f"source: image {j + 1}, most relevant {k}×{k}", fontsize=8)
        else:
            ax[2].set_title("own source: not mixed", fontsize=8)
        ax[4].imshow(rgb(mixed[i]))
        ax[4].set_title(f"mixed: λ(source caption) = {float(share[i]):.2f}", fontsize=8)
        for a in ax:
            a.set_xticks([]), a.set_yticks([])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkpoint = Path(args.checkpoint).expanduser()
    try:
        model, timix, run_config = load_model_and_timix(checkpoint)
        pattern = args.shards
        if pattern is None:
            from mplug_ds.data.demo_shards import prepare_demo_shards

            cache = args.demo_cache or (run_config.get("data") or {}).get("cache_dir") or "~/.cache/mplug_ds/demo"
            pattern = prepare_demo_shards(Path(cache).expanduser()).test
        images, ids, mask, captions = load_batch(pattern, args.images, args.skip, model.cfg.vision.image_size)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"timix_viz: {err}", file=sys.stderr)
        return 1
    probs, plan, mixed, share = timix_batch(model, timix, images, ids, mask, args.seed, args.side)
    out = Path(args.out) if args.out else (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "timix_viz.png"
    draw(images, captions, probs, plan, mixed, share, model.cfg.vision.patch_size, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
