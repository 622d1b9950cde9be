"""The procedural demo: deterministic, written in the real formats, and its texts match what is drawn."""
from __future__ import annotations

import hashlib
import json
import importlib.util
from pathlib import Path

import pytest

from mplug_ds.data.demo import COLORS, SHAPES, generate_demo

NUM_IMAGES = 10


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate_demo(tmp_path_factory.mktemp("demo"), seed=3, num_images=NUM_IMAGES, image_size=96)


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_different(demo, tmp_path):
    again = generate_demo(tmp_path / "again", seed=3, num_images=NUM_IMAGES, image_size=96)
    assert _digests(again.root) == _digests(demo.root)
    other = generate_demo(tmp_path / "other", seed=4, num_images=NUM_IMAGES, image_size=96)
    assert _digests(other.root) != _digests(demo.root)


def _color_close(pixel, name):
    return all(abs(a - b) <= 40 for a, b in zip(pixel, COLORS[name]))


def test_karpathy_captions_name_the_drawn_shapes(demo, tmp_path, shards):
    spec = demo.shard_inputs["coco-karpathy"]
    assert shards.run("--format", "coco-karpathy", "--ann", *spec["ann"], "--images", spec["images"],
                      "--out", tmp_path / "coco") == 0
    samples = shards.read(tmp_path / "coco")
    assert len(samples) == NUM_IMAGES
    for scene in demo.scenes:
        sample = samples[f"coco_{scene.image_id:012d}"]
        assert sample.split == scene.split and len(sample.texts) == 5
        for group in scene.groups:
            assert any(group.color in t.lower() and group.kind in t.lower() for t in sample.texts), sample.texts
        for shape in (s for g in scene.groups for s in g.shapes):
            x0, y0, x1, y1 = shape.box
            assert _color_close(sample.image.getpixel(((x0 + x1) // 2, (y0 + y1 * 3) // 4)), shape.color)


def test_vg_region_phrases_match_the_pixels_in_their_boxes(demo, tmp_path, shards):
    spec = demo.shard_inputs["vg-regions"]
    assert shards.run("--format", "vg-regions", "--ann", *spec["ann"], "--images", spec["images"],
                      "--out", tmp_path / "vg") == 0
    samples = shards.read(tmp_path / "vg")
    assert len(samples) == NUM_IMAGES
    checked = 0
    for sample in samples.values():
        for text, (x0, y0, x1, y1) in zip(sample.texts, sample.boxes):
            words = text.split()
            if words[-1].rstrip("s") in SHAPES and words[-2] in COLORS and words[0] in ("a", "one"):
                centre = sample.image.getpixel((int(x0 + x1) // 2, int(y0 + 3 * y1) // 4))
                assert _color_close(centre, words[-2]), (sample.key, text, centre)
                checked += 1
    assert checked >= NUM_IMAGES


def test_every_demo_format_shards_without_rejects(demo, tmp_path, shards):
    for name, spec in demo.shard_inputs.items():
        out = tmp_path / name
        assert shards.run("--format", name, "--ann", *spec["ann"], "--images", spec["images"], *spec["flags"],
                          "--out", out) == 0, name
        manifest = shards.manifest(out)
        assert manifest["skipped"] == 0 and manifest["total_samples"] > 0, (name, shards.skipped(out)[:3])
        samples = shards.read(out)
        if name == "vqa-v2":
            assert all(abs(sum(s.answer_weights) - 1) < 1e-6 and len(s.extra["all_answers"]) == 10
                       for s in samples.values())
        if name == "nlvr2":
            assert {s.label for s in samples.values()} == {0, 1}
        if name == "snli-ve":
            assert {s.label for s in samples.values()} == {0, 1, 2}


def test_default_demo_from_the_cli_prints_its_splits_and_shard_commands(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "make_demo_data", Path(__file__).resolve().parents[2] / "tools" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    assert "600 train / 100 val / 100 test" in printed and "--format refcoco" in printed
    assert len(list((tmp_path / "demo" / "coco" / "train2014").glob("*.jpg"))) == 600


def _nlvr2_truth(sentence: str, left, right) -> bool:
    words = sentence.rstrip(".").split()
    if words[0] == "Both":
        return all(any(g.kind == words[-1] for g in scene.groups) for scene in (left, right))
    scene = left if words[1] == "left" else right
    return any((g.color, g.kind) == (words[-2], words[-1]) for g in scene.groups)


def test_nlvr2_statements_come_in_true_false_pairs_of_one_template_labelled_by_the_drawn_scenes(demo):
    """Each pair of images gets a true and a false statement of one wording pattern, so the text alone cannot
    tell the label; the label is what the two drawn scenes make of the statement."""
    scenes = {scene.image_id: scene for scene in demo.scenes}
    lines = [json.loads(line) for name in ("train", "dev", "test1")
             for line in (demo.root / "nlvr2" / f"{name}.json").read_text().splitlines()]
    assert len(lines) == 2 * NUM_IMAGES
    pairs: dict[str, list[dict]] = {}
    for line in lines:
        left, right = (scenes[int(line[key].rsplit("/", 1)[1][:-4])] for key in ("left_url", "right_url"))
        assert str(_nlvr2_truth(line["sentence"], left, right)) == line["label"], line
        pairs.setdefault(line["identifier"].rsplit("-", 1)[0], []).append(line)
    for both in pairs.values():
        assert sorted(x["label"] for x in both) == ["False", "True"]
        assert [x["sentence"].split()[:3] for x in both][0] == [x["sentence"].split()[:3] for x in both][1]
