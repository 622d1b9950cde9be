"""TiMix mixing: window search, patch copy in pixel and token space, soft targets, schedule (timix_algorithm.md §13)."""
import itertools

import pytest
import torch

from mplug_ds.models.config import load_model_config
from mplug_ds.models.vision import VisionEncoder
from mplug_ds.objectives.timix import TimixConfig
from mplug_ds.objectives.timix_mixing import (
    LABEL_MODES,
    best_windows,
    draw_partners,
    draw_sides,
    mix_pixels,
    mix_tokens,
    mixed_targets,
    plan_mix,
    side_range,
    source_share,
    standardize,
    window_sums,
)


def _brute_force_best(score_map, k, largest):
    s = score_map.shape[0]
    corners = [(r, c) for r in range(s - k + 1) for c in range(s - k + 1)]
    sums = [float(score_map[r:r + k, c:c + k].double().sum()) for r, c in corners]
    best = max(sums) if largest else min(sums)
    return corners[sums.index(best)]  # first in row-major order on ties


@pytest.mark.parametrize("grid", [4, 7, 16])
def test_one_hot_block_is_found_exactly_and_never_chosen_as_least_relevant(grid):
    for k in {1, 2, grid // 2, grid - 1}:
        for r, c in [(0, 0), (grid - k, grid - k), ((grid - k) // 2, grid - k)]:
            scores = torch.zeros(1, grid, grid)
            scores[0, r:r + k, c:c + k] = 1.0
            sides = torch.tensor([k])
            assert best_windows(scores.view(1, -1), sides, largest=True).tolist() == [[r, c]]
            lr, lc = best_windows(scores.view(1, -1), sides, largest=False)[0].tolist()
            overlaps = lr < r + k and r < lr + k and lc < c + k and c < lc + k
            free_exists = (r >= k or grid - r - k >= k) or (c >= k or grid - c - k >= k)
            assert not (overlaps and free_exists)
            assert int(window_sums(scores, sides).isfinite().sum()) == (grid - k + 1) ** 2


def test_vectorised_search_with_per_sample_sides_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 8 * 8, generator=gen)
    sides = torch.tensor([1, 2, 3, 5, 7, 4])
    for largest in (True, False):
        found = best_windows(scores, sides, largest).tolist()
        expected = [list(_brute_force_best(scores[b].view(8, 8), int(sides[b]), largest)) for b in range(6)]
        assert found == expected


def test_pixels_outside_target_window_unchanged_and_inside_equal_source_window():
    patch, grid, b = 4, 6, 5
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(b, 3, grid * patch, grid * patch, generator=gen)
    scores = torch.randn(b, grid * grid, generator=gen)
    sides = torch.tensor([1, 2, 3, 4, 5])
    plan = plan_mix(scores, sides, draw_partners(b, "derangement"))
    mixed = mix_pixels(images, plan, patch)
    for i in range(b):
        k, (tr, tc), (sr, sc), j = int(sides[i]), plan.target[i].tolist(), plan.source[i].tolist(), int(plan.partners[i])
        assert (tr, tc) == _brute_force_best(scores[i].view(grid, grid), k, largest=False)
        assert (sr, sc) == _brute_force_best(scores[j].view(grid, grid), k, largest=True)
        window = (slice(None), slice(tr * patch, (tr + k) * patch), slice(tc * patch, (tc + k) * patch))
        source = images[j][:, sr * patch:(sr + k) * patch, sc * patch:(sc + k) * patch]
        assert torch.equal(mixed[i][window], source)
        outside = torch.ones_like(mixed[i], dtype=torch.bool)
        outside[window] = False
        assert torch.equal(mixed[i][outside], images[i][outside])
        assert int(plan.inside[i].sum()) == k * k


def test_token_space_mixing_equals_pixel_space_mixing_through_the_patch_embedding():
    torch.manual_seed(0)
    cfg = load_model_config("tiny", ["vision.image_size=96"])
    encoder = VisionEncoder(cfg.vision).eval()
    images = torch.randn(4, 3, 96, 96)
    plan = plan_mix(torch.randn(4, 36), torch.tensor([2, 3, 4, 1]), draw_partners(4, "flip"))
    with torch.no_grad():
        token_space = mix_tokens(encoder.embed_patches(images), plan)
        pixel_space = encoder.embed_patches(mix_pixels(images, plan, cfg.vision.patch_size))
        assert torch.allclose(token_space, pixel_space, atol=1e-5)
        mixed_in_encoder = encoder(images, patch_mix=lambda patches: mix_tokens(patches, plan))
        assert torch.allclose(mixed_in_encoder, encoder(mix_pixels(images, plan, 16)), atol=1e-5)


def _plan(b, grid=4, seed=0, pairing="derangement", per_sample=True):
    torch.manual_seed(seed)
    k_min, k_max = side_range(grid, 0.35, 0.75)
    return plan_mix(torch.randn(b, grid * grid), draw_sides(b, k_min, k_max, per_sample),
                    draw_partners(b, pairing)), torch.rand(b, grid * grid)


@pytest.mark.parametrize("mode", LABEL_MODES)
@pytest.mark.parametrize("b", [2, 5])
def test_every_target_row_sums_to_one(mode, b):
    plan, probs = _plan(b)
    base = torch.softmax(torch.randn(b, b), dim=1) if mode.endswith("_pred") else None
    y_i2t, y_t2i = mixed_targets(source_share(plan, mode, probs), plan.partners, base,
                                 None if base is None else torch.softmax(torch.randn(b, b), dim=1))
    for y in (y_i2t, y_t2i):
        assert torch.allclose(y.sum(dim=1), torch.ones(b), atol=1e-6)
        assert (y >= 0).all()


def test_area_onehot_with_one_side_per_batch_and_flip_is_symmetric():
    plan, probs = _plan(6, pairing="flip", per_sample=False)
    y_i2t, y_t2i = mixed_targets(source_share(plan, "area_onehot", probs), plan.partners)
    assert torch.allclose(y_i2t, y_t2i)
    lam = float(plan.sides[0]) ** 2 / 16
    assert torch.allclose(y_i2t[0, 5], torch.tensor(lam)) and torch.allclose(y_i2t[0, 0], torch.tensor(1 - lam))


def test_relevance_labels_follow_the_relevance_mass_and_per_rank_rows_stay_on_their_pairs():
    b, world = 3, 2
    plans = [_plan(b, seed=r) for r in range(world)]
    shares = torch.cat([source_share(p, "relevance_onehot", probs) for p, probs in plans])
    partners = torch.cat([p.partners + r * b for r, (p, _) in enumerate(plans)])
    y_i2t, y_t2i = mixed_targets(shares, partners)
    for g in range(world * b):
        support = set(torch.nonzero(y_i2t[g]).flatten().tolist())
        assert support <= {g, int(partners[g])}
        assert torch.allclose(y_i2t[g, partners[g]], shares[g])
    plan, probs = plans[0]
    pasted = (probs[plan.src_image, plan.src_patch] * plan.inside).sum(1)
    kept = (probs * ~plan.inside).sum(1)
    assert torch.allclose(shares[:b], pasted / (pasted + kept), atol=1e-5)
    assert torch.allclose(y_t2i.sum(dim=1), torch.ones(world * b), atol=1e-6)


def test_constant_relevance_gives_no_nan():
    b, n = 4, 16
    probs = torch.full((b, n), 0.5)
    scores = standardize(probs.log())
    assert torch.equal(scores, torch.zeros(b, n))
    plan = plan_mix(scores, torch.tensor([2, 2, 3, 1]), draw_partners(b, "flip"))
    assert plan.target.tolist() == [[0, 0]] * b  # ties: the first window
    for mode in LABEL_MODES:
        y = mixed_targets(source_share(plan, mode, probs), plan.partners, torch.full((b, b), 1 / b),
                          torch.full((b, b), 1 / b))
        assert all(t.isfinite().all() for t in y)


def test_pairings_and_odd_batches():
    for b in (2, 3, 7):
        partners = draw_partners(b, "derangement")
        assert sorted(partners.tolist()) == list(range(b)) and not (partners == torch.arange(b)).any()
    flip = draw_partners(5, "flip")
    assert flip.tolist() == [4, 3, 2, 1, 0]
    images = torch.randn(5, 3, 64, 64)
    plan = plan_mix(torch.randn(5, 16), torch.full((5,), 2), flip)
    assert torch.equal(mix_pixels(images, plan, 16)[2], images[2])  # the middle image is its own source
    y_i2t, y_t2i = mixed_targets(source_share(plan, "area_onehot"), plan.partners)
    assert y_i2t[2, 2] == 1 and y_t2i[2, 2] == 1


def test_side_range_and_sides():
    assert side_range(16, 0.35, 0.75) == (5, 12)  # the reference's k ∈ {5 … 12} at 256 px / patch 16
    assert side_range(4, 0.35, 0.75) == (1, 3)
    batch_sides = draw_sides(8, 5, 12, per_sample=False)
    assert len(set(batch_sides.tolist())) == 1
    seen = set(itertools.chain.from_iterable(draw_sides(64, 5, 12, per_sample=True).tolist() for _ in range(5)))
    assert seen == set(range(5, 13))


def test_gamma_ramps_from_zero_and_mixing_stops_at_the_configured_step():
    cfg = TimixConfig(enabled=True, gamma_ramp_steps=10, mix_stop_step=30, mix_weight=0.5)
    assert cfg.gamma(0) == 0.0
    assert cfg.gamma(5) == pytest.approx(0.25)
    assert cfg.gamma(10) == cfg.gamma(29) == 0.5
    assert cfg.gamma(30) == cfg.gamma(1000) == 0.0
    assert TimixConfig(enabled=False).gamma(50) == 0.0
    assert TimixConfig(enabled=True, gamma_ramp_steps=0).gamma(0) == 1.0
    assert TimixConfig().layer_for(12) == 5 and TimixConfig().layer_for(24) == 11
