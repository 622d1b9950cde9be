"""Image, box-aware and region transforms, text normalisation, and box → patch labels.

Every random transform takes an explicit ``random.Random`` so that a pipeline can derive all of its
randomness from (seed, rank, worker, sample index) and replay it exactly after a restore.
Boxes are ``[x0, y0, x1, y1]`` absolute pixels, x1/y1 exclusive (see ``mplug_ds.data.sample``).
"""
from __future__ import annotations

import math
import random
import re
from typing import Callable, Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = TF.InterpolationMode.BICUBIC
FILL = (124, 116, 104)  # the CLIP mean as 8-bit RGB: neutral after normalisation

Box = list[float]


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------
_DELETED = re.compile(r"[,.'!?\"()*#:;~]")
_SPACED = re.compile(r"[-/]")


def pre_caption(text: str, max_words: int = 30) -> str:
    """Caption normalisation of the reference: lower-case, strip punctuation, '-' and '/' → space,
    ``<person>`` → person, collapse spaces, keep at most ``max_words`` words."""
    text = _SPACED.sub(" ", _DELETED.sub("", text.lower())).replace("<person>", "person")
    return " ".join(text.split()[:max_words])


def pre_question(text: str, max_words: int = 50) -> str:
    """Question normalisation of the reference: caption deletions/replacements, no ``<person>`` step."""
    text = _SPACED.sub(" ", _DELETED.sub("", text.lower())).rstrip()
    return " ".join(text.split(" ")[:max_words])


_LEFT_RIGHT = re.compile(r"\b(left|right)(?=(?:most)?\b)", re.IGNORECASE)  # also leftmost/rightmost


def swap_left_right(text: str) -> str:
    """Exchange the words 'left' and 'right' (what a horizontal flip does to a spatial description)."""
    def swap(m: re.Match) -> str:
        word = "right" if m.group(0).lower() == "left" else "left"
        return word.upper() if m.group(0).isupper() else word.capitalize() if m.group(0)[0].isupper() else word
    return _LEFT_RIGHT.sub(swap, text)


# --------------------------------------------------------------------------------------------------
# RandAugment with the reference op list
# --------------------------------------------------------------------------------------------------
def _signed(rng: random.Random, value: float) -> float:
    return value if rng.random() < 0.5 else -value


def _affine(img: Image.Image, **kw: float) -> Image.Image:
    params = {"angle": 0.0, "translate": [0, 0], "scale": 1.0, "shear": [0.0, 0.0]} | kw
    return TF.affine(img, interpolation=TF.InterpolationMode.NEAREST, fill=list(FILL), **params)


RAND_OPS: dict[str, Callable[[Image.Image, float, random.Random], Image.Image]] = {
    # level in [0, 1] (= M / 10); each geometric op picks a random direction.
    "Identity": lambda img, level, rng: img,
    "AutoContrast": lambda img, level, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, level, rng: ImageOps.equalize(img),
    "Brightness": lambda img, level, rng: ImageEnhance.Brightness(img).enhance(1 + _signed(rng, 0.9 * level)),
    "Sharpness": lambda img, level, rng: ImageEnhance.Sharpness(img).enhance(1 + _signed(rng, 0.9 * level)),
    "ShearX": lambda img, level, rng: _affine(img, shear=[math.degrees(math.atan(_signed(rng, 0.3 * level))), 0.0]),
    "ShearY": lambda img, level, rng: _affine(img, shear=[0.0, math.degrees(math.atan(_signed(rng, 0.3 * level)))]),
    "TranslateX": lambda img, level, rng: _affine(img, translate=[round(_signed(rng, 0.1 * level) * img.width), 0]),
    "TranslateY": lambda img, level, rng: _affine(img, translate=[0, round(_signed(rng, 0.1 * level) * img.height)]),
    "Rotate": lambda img, level, rng: _affine(img, angle=_signed(rng, 30.0 * level)),
}
COLOUR_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness")


class RandAugment:
    """Pick ``n`` ops from ``ops`` uniformly; apply each with probability 0.5 at magnitude ``m`` of 10.

    Brightness/Sharpness factor 1 ± 0.9·m/10, shear ±0.3·m/10, translate ±10%·m/10 of the side,
    rotate ±30°·m/10; uncovered pixels are filled with the CLIP mean colour.
    """

    def __init__(self, n: int = 2, m: int = 7, ops: Sequence[str] = tuple(RAND_OPS)) -> None:
        unknown = [op for op in ops if op not in RAND_OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; choose from {list(RAND_OPS)}")
        self.n, self.level, self.ops = n, m / 10.0, list(ops)

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        for name in rng.choices(self.ops, k=self.n):
            if rng.random() < 0.5:
                img = RAND_OPS[name](img, self.level, rng)
        return img


# --------------------------------------------------------------------------------------------------
# Whole-image transforms
# --------------------------------------------------------------------------------------------------
def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) float tensor, CLIP mean/std normalised."""
    return TF.normalize(TF.to_tensor(img), CLIP_MEAN, CLIP_STD)


def random_resized_crop_box(rng: random.Random, width: int, height: int, scale: tuple[float, float],
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height) of a random crop covering ``scale`` of the area at aspect ``ratio``;
    always inside the image (after 10 failed draws: the largest centred crop with aspect clamped to ``ratio``)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # Fallback: the largest centred crop whose aspect is clamped into ``ratio`` (a wide image keeps its height,
    # a tall one its width), so the box never leaves the image whatever its shape.
    aspect = width / height
    if aspect > ratio[1]:
        w, h = min(width, max(1, round(height * ratio[1]))), height
    elif aspect < ratio[0]:
        w, h = width, min(height, max(1, round(width / ratio[0])))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TrainTransform:
    """RandomResizedCrop(res, scale, bicubic) → horizontal flip (p 0.5) → RandAugment → CLIP-normalised tensor."""

    def __init__(self, res: int, scale: tuple[float, float] = (0.2, 1.0), randaug: RandAugment | None = None,
                 flip: bool = True) -> None:
        self.res, self.scale, self.flip = res, scale, flip
        self.randaug = randaug if randaug is not None else RandAugment()

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        left, top, w, h = random_resized_crop_box(rng, img.width, img.height, self.scale)
        img = TF.resized_crop(img, top, left, h, w, [self.res, self.res], interpolation=BICUBIC)
        if self.flip and rng.random() < 0.5:
            img = TF.hflip(img)
        return to_normalized_tensor(self.randaug(img, rng))


class TestTransform:
    """Resize((res, res), bicubic) → CLIP-normalised tensor (``rng`` accepted and unused)."""

    def __init__(self, res: int) -> None:
        self.res = res

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return to_normalized_tensor(TF.resize(img, [self.res, self.res], interpolation=BICUBIC))


def image_transform(res: int, train: bool, scale_min: float = 0.2,
                    augment: bool = True) -> TrainTransform | TestTransform:
    """The image transform for training (scale_min 0.2 pre-training / 0.5 fine-tuning) or evaluation.

    ``augment=False`` keeps only the random crop: no flip (it swaps left and right) and no RandAugment (its
    Equalize/AutoContrast change hues), for data whose texts name sides and colours.
    """
    if not train:
        return TestTransform(res)
    if not augment:
        return TrainTransform(res, (scale_min, 1.0), RandAugment(n=0), flip=False)
    return TrainTransform(res, (scale_min, 1.0))


# --------------------------------------------------------------------------------------------------
# Box-aware transforms
# --------------------------------------------------------------------------------------------------
def crop_boxes(boxes: Sequence[Box], crop: Sequence[float]) -> list[Box]:
    """Boxes intersected with ``crop`` (xyxy) and shifted to its origin (may become empty: x1 <= x0)."""
    cx0, cy0, cx1, cy1 = crop
    return [[max(x0, cx0) - cx0, max(y0, cy0) - cy0, min(x1, cx1) - cx0, min(y1, cy1) - cy0]
            for x0, y0, x1, y1 in boxes]


def hflip_boxes(boxes: Sequence[Box], width: float) -> list[Box]:
    """Boxes mirrored left-right in an image of ``width`` pixels."""
    return [[width - x1, y0, width - x0, y1] for x0, y0, x1, y1 in boxes]


def scale_boxes(boxes: Sequence[Box], sx: float, sy: float) -> list[Box]:
    """Boxes scaled by ``sx`` horizontally and ``sy`` vertically."""
    return [[x0 * sx, y0 * sy, x1 * sx, y1 * sy] for x0, y0, x1, y1 in boxes]


def box_area(box: Sequence[float]) -> float:
    """Area of an xyxy box (0 when empty)."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def letterbox_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """Size of a width×height image resized (aspect kept) so that its long side is ``long_side``."""
    return (max(1, round(width * long_side / max(width, height))),
            max(1, round(height * long_side / max(width, height))))


def resize_and_pad(img: Image.Image, box: Box | None, res: int, long_side: int,
                   rng: random.Random | None = None) -> tuple[Image.Image, Box | None]:
    """Resize so the long side is ``long_side`` (bicubic), then pad to res×res with the CLIP mean colour,
    at a random offset when ``rng`` is given, else centred. The box (if any) moves with the image."""
    w, h = letterbox_size(img.width, img.height, long_side)
    if box is not None:
        (box,) = scale_boxes([box], w / img.width, h / img.height)
    img = img.resize((w, h), Image.BICUBIC)
    dx, dy = (rng.randint(0, res - w), rng.randint(0, res - h)) if rng else ((res - w) // 2, (res - h) // 2)
    canvas = Image.new("RGB", (res, res), FILL)
    canvas.paste(img, (dx, dy))
    return canvas, None if box is None else [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]


def grounding_transform(img: Image.Image, box: Box | None, text: str, res: int, train: bool,
                        rng: random.Random | None = None,
                        augment: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Grounding (REC) image, box and text, TransVG-style.

    Train: flip (p 0.5, 'left'/'right' swapped in the text) and colour RandAugment unless ``augment=False``
    (expressions that name colours); long side resized to res·(1 − k/20), k ~ U{0..6}; pad to res×res at a random
    offset. Test: long side = res, centred. Returns (normalised image, box (cx, cy, w, h) in [0, 1] of the padded
    side, text); at test time ``box`` may be ``None`` (an expression to ground), and so is the returned box.
    """
    if train:
        if rng is None or box is None:
            raise ValueError("grounding_transform(train=True) needs an rng and a box")
        if augment and rng.random() < 0.5:
            img, (box,) = TF.hflip(img), hflip_boxes([box], img.width)
            text = swap_left_right(text)
        if augment:
            img = RandAugment(ops=COLOUR_OPS)(img, rng)
        img, box = resize_and_pad(img, box, res, round(res * (1 - rng.randint(0, 6) / 20)), rng)
    else:
        img, box = resize_and_pad(img, box, res, res)
    if box is None:
        return to_normalized_tensor(img), None, text
    x0, y0, x1, y1 = (min(max(v / res, 0.0), 1.0) for v in box)
    norm_box = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dtype=torch.float32)
    return to_normalized_tensor(img), norm_box, text


def box_from_letterbox(box: Sequence[float], width: int, height: int, res: int) -> Box:
    """Undo the test-time ``resize_and_pad`` (long side = res, centred): an xyxy box in res×res pixels → the
    same box in the pixels of the original width×height image, clipped to it."""
    w, h = letterbox_size(width, height, res)
    dx, dy = (res - w) // 2, (res - h) // 2
    sx, sy = width / w, height / h
    x0, y0, x1, y1 = (box[0] - dx) * sx, (box[1] - dy) * sy, (box[2] - dx) * sx, (box[3] - dy) * sy
    return [min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width),
            min(max(y1, 0.0), height)]


# --------------------------------------------------------------------------------------------------
# Regions (TiMix patch-text alignment)
# --------------------------------------------------------------------------------------------------
def region_crop(rng: random.Random, width: int, height: int, box: Box) -> tuple[int, int, int, int]:
    """A random crop (xyxy) of a width×height image that fully contains ``box``."""
    x0, y0, x1, y1 = box
    return (rng.randint(0, max(0, math.floor(x0))), rng.randint(0, max(0, math.floor(y0))),
            rng.randint(min(math.ceil(x1), width), width), rng.randint(min(math.ceil(y1), height), height))


def region_transform(img: Image.Image, boxes: Sequence[Box], anchor: int, res: int, rng: random.Random,
                     min_inside: float = 0.5) -> tuple[torch.Tensor, list[int], list[Box], bool]:
    """Crop containing ``boxes[anchor]``, flip (p 0.5), resize to res×res ignoring aspect, colour RandAugment.

    Returns (normalised image, indices of kept boxes, their boxes in res×res pixels, flipped). A box is kept
    when at least ``min_inside`` of its area lies inside the crop; it is clipped to the crop.
    """
    crop = region_crop(rng, img.width, img.height, boxes[anchor])
    cw, ch = crop[2] - crop[0], crop[3] - crop[1]
    img = img.crop(crop)
    moved = crop_boxes(boxes, crop)
    kept = [i for i, (orig, new) in enumerate(zip(boxes, moved))
            if box_area(orig) > 0 and box_area(new) >= min_inside * box_area(orig)]
    moved = [moved[i] for i in kept]
    flipped = rng.random() < 0.5
    if flipped:
        img, moved = TF.hflip(img), hflip_boxes(moved, cw)
    img = img.resize((res, res), Image.BICUBIC)
    moved = scale_boxes(moved, res / cw, res / ch)
    img = RandAugment(ops=COLOUR_OPS)(img, rng)
    return to_normalized_tensor(img), kept, moved, flipped


def box_to_patch_labels(box_xyxy: Sequence[float], image_size: int, patch_size: int) -> torch.Tensor:
    """Binary labels (grid², long) of the patches a box overlaps on the (image_size/patch_size)² grid.

    Columns ⌊x0/P⌋ … ⌈x1/P⌉−1 and rows likewise, clamped to the grid; at least one patch is positive.
    """
    grid = image_size // patch_size
    x0, y0, x1, y1 = box_xyxy
    c0 = min(max(math.floor(x0 / patch_size), 0), grid - 1)
    c1 = max(c0 + 1, min(math.ceil(x1 / patch_size), grid))
    r0 = min(max(math.floor(y0 / patch_size), 0), grid - 1)
    r1 = max(r0 + 1, min(math.ceil(y1 / patch_size), grid))
    labels = torch.zeros(grid, grid, dtype=torch.long)
    labels[r0:r1, c0:c1] = 1
    return labels.flatten()
