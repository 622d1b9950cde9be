"""Image, box-aware and region transforms, text normalisation and box → patch labels."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from mplug_ds.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    RandAugment,
    box_to_patch_labels,
    grounding_transform,
    image_transform,
    pre_caption,
    pre_question,
    random_resized_crop_box,
    region_transform,
    swap_left_right,
)


def patches(labels: torch.Tensor) -> set[int]:
    return set(labels.nonzero().flatten().tolist())


def test_patch_labels_exact_cases():
    assert patches(box_to_patch_labels([0, 0, 16, 16], 256, 16)) == {0}
    assert patches(box_to_patch_labels([0, 0, 1, 1], 256, 16)) == {0}
    assert box_to_patch_labels([0, 0, 256, 256], 256, 16).tolist() == [1] * 256
    assert patches(box_to_patch_labels([15, 0, 18, 1], 256, 16)) == {0, 1}  # pixels 15..17 span two columns
    assert patches(box_to_patch_labels([240, 240, 256, 256], 256, 16)) == {255}
    assert patches(box_to_patch_labels([16, 32, 48, 40], 256, 16)) == {2 * 16 + 1, 2 * 16 + 2}
    # a degenerate box at the far edge still marks one patch
    assert patches(box_to_patch_labels([256, 256, 256, 256], 256, 16)) == {255}


def bright_patches(image: torch.Tensor, patch: int, threshold: float) -> tuple[set[int], np.ndarray]:
    pixels = image.mean(0).numpy()
    mask = pixels > pixels.min() + threshold * (pixels.max() - pixels.min())
    grid = image.shape[-1] // patch
    cells = mask.reshape(grid, patch, grid, patch).any(axis=(1, 3))
    return set(np.flatnonzero(cells).tolist()), mask


def test_region_labels_match_rasterised_box_after_crop_flip_resize():
    res, patch = 128, 16
    img = np.zeros((300, 400, 3), dtype=np.uint8)
    box = [150, 90, 330, 250]
    img[box[1]:box[3], box[0]:box[2]] = 255
    image = Image.fromarray(img)
    flips = set()
    for seed in range(12):
        tensor, kept, moved, flipped = region_transform(image, [box], 0, res, random.Random(seed))
        flips.add(flipped)
        assert kept == [0]
        labels = patches(box_to_patch_labels(moved[0], res, patch))
        bright, mask = bright_patches(tensor, patch, 0.75)
        assert bright and bright <= labels
        grid = res // patch
        near_bright = {p + dr * grid + dc for p in bright for dr in (-1, 0, 1) for dc in (-1, 0, 1)}
        assert labels <= near_bright
        ys, xs = np.nonzero(mask)
        cx, cy = (moved[0][0] + moved[0][2]) / 2, (moved[0][1] + moved[0][3]) / 2
        assert abs(xs.mean() + 0.5 - cx) < 3 and abs(ys.mean() + 0.5 - cy) < 3
    assert flips == {True, False}


def test_region_keeps_only_boxes_at_least_half_inside_the_crop():
    image = Image.new("RGB", (200, 200))
    anchor, other = [0, 0, 20, 20], [150, 150, 200, 200]
    outcomes = set()
    for seed in range(40):
        _, kept, moved, _ = region_transform(image, [anchor, other], 0, 64, random.Random(seed), min_inside=0.5)
        # the crop starts at (0, 0) because the anchor does; its size follows from the anchor's scaling
        crop_w = 20 * 64 / (moved[0][2] - moved[0][0])
        crop_h = 20 * 64 / (moved[0][3] - moved[0][1])
        inside = max(0.0, crop_w - 150) * max(0.0, crop_h - 150)
        expected = [0, 1] if inside >= 0.5 * 2500 else [0]
        assert kept == expected
        outcomes.add(len(kept))
    assert outcomes == {1, 2}


def test_random_resized_crop_area_and_ratio():
    rng = random.Random(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(rng, 300, 200, (0.2, 1.0))
        assert 0 <= left and left + w <= 300 and 0 <= top and top + h <= 200
        assert 0.19 * 60000 <= w * h <= 60000 * 1.01


def test_random_resized_crop_stays_inside_the_image_for_every_shape():
    """Property over random sizes, biased to extreme aspect ratios (where the 10 draws fail and the fallback runs)."""
    rng, fallbacks = random.Random(1), 0
    for _ in range(20000):
        width = rng.choice([1, 2, 3, rng.randint(1, 64), rng.randint(1, 5000)])
        height = rng.choice([1, 2, 3, rng.randint(1, 64), rng.randint(1, 5000)])
        lo = rng.uniform(0.01, 1.0)
        scale = (lo, rng.uniform(lo, 1.0))
        left, top, w, h = random_resized_crop_box(rng, width, height, scale)
        assert 1 <= w and 1 <= h and 0 <= left and left + w <= width and 0 <= top and top + h <= height, \
            (width, height, scale, (left, top, w, h))
        fallbacks += max(width, height) / min(width, height) > 4
    assert fallbacks > 1000  # the extreme shapes were exercised


@pytest.mark.parametrize("size", [(400, 100), (100, 400), (20000, 3), (3, 20000)])
def test_train_transform_on_a_wide_or_tall_image_never_pads(size):
    """On a white image every output pixel stays white: a crop box leaving the image would bring in black."""
    img = Image.new("RGB", size, (255, 255, 255))
    t = image_transform(32, train=True)
    t.randaug = RandAugment(ops=["Identity"])
    white = (torch.ones(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    for seed in range(200):
        out = t(img, random.Random(seed))
        assert torch.allclose(out, white[:, None, None].expand_as(out), atol=1e-3), (size, seed)


def test_train_transform_deterministic_per_rng_and_normalised():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    t = image_transform(32, train=True)
    a, b = t(img, random.Random(5)), t(img, random.Random(5))
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, t(img, random.Random(6)))
    test = image_transform(32, train=False)(Image.new("RGB", (50, 30), (255, 0, 128)))
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD)])
    assert torch.allclose(test.mean(dim=(1, 2)), expected, atol=1e-2)


def test_randaugment_rejects_unknown_op_and_changes_images():
    with pytest.raises(ValueError, match="Solarize"):
        RandAugment(ops=["Solarize"])
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    outs = {RandAugment(2, 7)(img, random.Random(s)).tobytes() for s in range(20)}
    assert len(outs) > 5


def test_grounding_test_transform_box_normalisation():
    img = Image.new("RGB", (200, 100))
    _, box, text = grounding_transform(img, [0, 0, 100, 50], "left dog", 256, train=False)
    assert torch.allclose(box, torch.tensor([0.25, 0.375, 0.5, 0.25]), atol=1e-3)
    assert text == "left dog"


def test_grounding_train_flip_moves_box_and_swaps_words():
    img = np.zeros((100, 200, 3), dtype=np.uint8)
    img[20:60, 10:70, 0] = 255  # a red box on black: separable from the grey padding whatever the colour ops do
    seen = set()
    for seed in range(16):
        tensor, box, text = grounding_transform(Image.fromarray(img), [10, 20, 70, 60], "the left cup", 128,
                                                train=True, rng=random.Random(seed))
        flipped = text == "the right cup"
        seen.add(flipped)
        assert (box[0] > 0.5) == flipped  # box centre moved to the right half when flipped
        rgb = tensor * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]
        mask = ((rgb[0] > 0.5 * rgb[0].max()) & (rgb[1] < 0.1)).numpy()
        ys, xs = np.nonzero(mask)
        assert abs((xs.mean() + 0.5) / 128 - box[0]) < 0.03 and abs((ys.mean() + 0.5) / 128 - box[1]) < 0.03
    assert seen == {True, False}


def test_grounding_train_without_augment_keeps_colours_and_sides():
    img = np.zeros((100, 200, 3), dtype=np.uint8)
    img[20:60, 10:70] = (230, 200, 20)  # a yellow box on the left: "yellow" and "leftmost" must stay true
    for seed in range(8):
        tensor, box, text = grounding_transform(Image.fromarray(img), [10, 20, 70, 60], "the leftmost yellow cup",
                                                128, train=True, rng=random.Random(seed), augment=False)
        assert text == "the leftmost yellow cup" and box[0] < 0.5
        rgb = tensor * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]
        x, y = int(box[0] * 128), int(box[1] * 128)
        assert torch.allclose(rgb[:, y, x], torch.tensor([230, 200, 20]) / 255, atol=0.02)


def test_text_normalisation():
    assert pre_caption("A Dog-on the  red/blue Couch!!  (really)", 30) == "a dog on the red blue couch really"
    assert pre_caption("<person> rides a horse.", 30) == "person rides a horse"
    assert pre_caption("one two three four", 2) == "one two"
    assert pre_question("What's the dog lying on?  ") == "whats the dog lying on"
    assert swap_left_right("Left of the right cup, leftover") == "Right of the left cup, leftover"
    assert swap_left_right("the leftmost cup, Rightmost plate") == "the rightmost cup, Leftmost plate"
