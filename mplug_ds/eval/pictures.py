"""A picture of an evaluation: a grid of evaluated samples, each with its image(s), boxes and what was predicted."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image

from mplug_ds.runtime.atomic import atomic_save_png

GROUND_TRUTH = "tab:green"
PREDICTED = "tab:red"
COLUMNS = 4  # panels per row for single images (fewer for wider panels)


@dataclass
class Panel:
    """One sample as shown: its images side by side, boxes on the first image, text lines under it, and whether
    the prediction was right (green title), wrong (red) or not judged (``None``, black)."""

    images: list[Image.Image]
    lines: list[str]
    correct: bool | None = None
    boxes: list[tuple[Sequence[float], str, str]] = field(default_factory=list)  # (xyxy pixels, colour, label)


def draw_panels(panels: Sequence[Panel], out: Path, title: str) -> Path:
    """Write ``panels`` as a grid PNG to ``out`` (atomically) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    shown = [_side_by_side(panel.images) for panel in panels]
    aspect = max(im.width / im.height for im in shown)  # a pair is twice as wide as it is tall
    columns = max(1, min(round(COLUMNS / aspect), len(panels)))  # one image: one panel, not a row of blanks
    rows = max(1, -(-len(panels) // columns))
    texts = ["\n".join(textwrap.fill(line, round(44 * aspect)) for line in panel.lines) for panel in panels]
    text_height = 0.16 * max(text.count("\n") + 1 for text in texts)  # inches: the tallest title
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * aspect * columns, (3.4 + text_height) * rows),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, panel, image, text in zip(axes.flat, panels, shown, texts):
        ax.imshow(image)
        for box, colour, label in panel.boxes:
            x0, y0, x1, y1 = box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2, label=label))
        if panel.boxes:
            ax.legend(loc="lower right", fontsize=7, framealpha=0.7)
        colour = {True: GROUND_TRUTH, False: PREDICTED, None: "black"}[panel.correct]
        ax.set_title(text, fontsize=8, color=colour, loc="left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return atomic_save_png(fig, out, dpi=90)
    finally:
        plt.close(fig)


def _side_by_side(images: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """The images in one row on a white background (NLVR2's pair), each scaled to the first one's height."""
    if len(images) == 1:
        return images[0].convert("RGB")
    height = images[0].height
    scaled = [im.convert("RGB").resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    row = Image.new("RGB", (sum(im.width for im in scaled) + gap * (len(scaled) - 1), height), "white")
    x = 0
    for im in scaled:
        row.paste(im, (x, 0))
        x += im.width + gap
    return row
