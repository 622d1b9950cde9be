"""make_shards behaviour a user relies on: bad inputs skipped and reported, resume, atomic output, resize, workers,
and exit statuses with messages naming the problem file."""
from __future__ import annotations

import json
import tarfile

import pytest

import mplug_ds
from mplug_ds.data.formats import ReaderArgs, read_format
from mplug_ds.data.shards import ShardOptions, write_shards


def _albef_dataset(tmp_path, shards, n=5):
    """``n`` good caption rows (images img0.jpg …), one image per row."""
    rows = []
    for i in range(n):
        shards.image(tmp_path / "img" / f"img{i}.jpg", color=(40 * i, 100, 200 - 30 * i))
        rows.append({"image": f"img{i}.jpg", "caption": f"caption number {i}"})
    return rows


def test_bad_inputs_are_skipped_counted_and_named(tmp_path, shards):
    rows = _albef_dataset(tmp_path, shards, n=2)
    (tmp_path / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    rows += [{"image": "corrupt.jpg", "caption": "a corrupt image"},
             {"image": "missing.jpg", "caption": "a missing image"},
             {"image": "img0.jpg", "caption": "   "},  # empty caption: img0 keeps its good caption
             {"image": "img1.jpg"},  # malformed: no caption
             "not even an object"]
    shards.image(tmp_path / "img" / "empty.jpg")
    rows.append({"image": "empty.jpg", "caption": ""})  # only an empty caption: the sample goes
    ann = shards.json(tmp_path / "train.json", rows)
    result = shards.cli("--format", "albef", "--ann", ann, "--images", tmp_path / "img", "--out", tmp_path / "out",
                        "--workers", "0")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    samples = shards.read(out)
    assert sorted(s.texts[0] for s in samples.values()) == ["caption number 0", "caption number 1"]
    reasons = {(s["source"].rsplit("/", 1)[-1], s["key"]): s["reason"] for s in shards.skipped(out)}
    assert "corrupt image" in reasons[("corrupt.jpg", "albef_corrupt")]
    assert "missing image file" in reasons[("missing.jpg", "albef_missing")]
    assert "empty caption" in reasons[("img0.jpg", "albef_img0")]
    assert "empty caption" in reasons[("empty.jpg", "albef_empty")]
    assert "missing field 'caption'" in reasons[("train.json", "[5]")]
    assert "expected a JSON object" in reasons[("train.json", "[6]")]
    assert shards.manifest(out)["skipped"] == len(reasons) == 6
    assert "images/s" in result.stderr


def test_boxes_outside_the_image(tmp_path, shards):
    shards.image(tmp_path / "img" / "VG_100K" / "1.jpg", size=(40, 30))
    shards.image(tmp_path / "img" / "VG_100K" / "2.jpg", size=(40, 30))
    regions = shards.json(tmp_path / "region_descriptions.json", [
        {"id": 1, "regions": [{"region_id": 1, "x": 2, "y": 2, "width": 10, "height": 10, "image_id": 1,
                               "phrase": "ok"},
                              {"region_id": 2, "x": 50, "y": 5, "width": 10, "height": 10, "image_id": 1,
                               "phrase": "right of the image"},
                              {"region_id": 3, "x": 5, "y": 5, "width": 0, "height": 10, "image_id": 1,
                               "phrase": "flat"}]},
        {"id": 2, "regions": [{"region_id": 4, "x": 5, "y": 40, "width": 5, "height": 5, "image_id": 2,
                               "phrase": "below the image"}]}])
    assert shards.run("--format", "vg-regions", "--ann", regions, "--images", tmp_path / "img",
                      "--out", tmp_path / "out") == 0
    samples = shards.read(tmp_path / "out")
    assert list(samples) == ["vg_1"] and samples["vg_1"].texts == ["ok"] and samples["vg_1"].boxes == [[2, 2, 12, 12]]
    reasons = {s["key"]: s["reason"] for s in shards.skipped(tmp_path / "out")}
    assert "outside the 40x30 image" in reasons["vg_1#1"] and "outside" in reasons["vg_1#2"]
    assert reasons["vg_2"] == "no region box inside the image"


def test_rerun_keeps_complete_shards_and_redoes_changed_ones(tmp_path, shards):
    rows = _albef_dataset(tmp_path, shards, n=5)
    ann = shards.json(tmp_path / "train.json", rows)
    args = ["--format", "albef", "--ann", ann, "--images", tmp_path / "img", "--out", tmp_path / "out",
            "--shard-size", "2"]
    assert shards.run(*args) == 0
    tars = sorted((tmp_path / "out").glob("albef-*.tar"))
    assert [t.name for t in tars] == ["albef-000000.tar", "albef-000001.tar", "albef-000002.tar"]
    before = {t.name: (t.stat().st_ino, t.stat().st_mtime_ns) for t in tars}

    assert shards.run(*args) == 0  # same inputs: nothing rewritten
    assert {t.name: (t.stat().st_ino, t.stat().st_mtime_ns) for t in tars} == before

    rows[3]["caption"] = "an edited caption"  # belongs to shard 1 only
    shards.json(ann, rows)
    (tmp_path / "out" / "albef-000002.tar").unlink()  # as if the first run had died before writing shard 2
    assert shards.run(*args) == 0
    after = {t.name: (t.stat().st_ino, t.stat().st_mtime_ns) for t in tars}
    assert after["albef-000000.tar"] == before["albef-000000.tar"]
    assert after["albef-000001.tar"] != before["albef-000001.tar"]
    assert (tmp_path / "out" / "albef-000002.tar").is_file()
    samples = shards.read(tmp_path / "out")
    assert samples["albef_img3"].texts == ["an edited caption"] and len(samples) == 5
    assert [s["samples"] for s in shards.manifest(tmp_path / "out")["shards"]] == [2, 2, 1]
    assert not list((tmp_path / "out").glob("*.tmp*"))


def test_rerun_after_fixing_a_broken_image_includes_it(tmp_path, shards):
    rows = _albef_dataset(tmp_path, shards, n=4)
    broken = tmp_path / "img" / "img2.jpg"
    good_bytes = broken.read_bytes()
    broken.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    ann = shards.json(tmp_path / "train.json", rows)
    args = ["--format", "albef", "--ann", ann, "--images", tmp_path / "img", "--out", tmp_path / "out",
            "--shard-size", "2"]
    assert shards.run(*args) == 0
    assert "albef_img2" not in shards.read(tmp_path / "out")
    untouched = (tmp_path / "out" / "albef-000000.tar").stat().st_mtime_ns

    broken.write_bytes(good_bytes)  # the user repairs the image and reruns with the same arguments
    assert shards.run(*args) == 0
    assert sorted(shards.read(tmp_path / "out")) == [f"albef_img{i}" for i in range(4)]
    assert shards.manifest(tmp_path / "out")["skipped"] == 0
    assert (tmp_path / "out" / "albef-000000.tar").stat().st_mtime_ns == untouched


def test_manifest_describes_the_run(tmp_path, shards):
    ann = shards.json(tmp_path / "train.json", _albef_dataset(tmp_path, shards, n=3))
    assert shards.run("--format", "albef", "--ann", ann, "--images", tmp_path / "img", "--out", tmp_path / "out",
                      "--shard-size", "2", "--prefix", "demo") == 0
    manifest = shards.manifest(tmp_path / "out")
    assert manifest["format"] == "albef" and manifest["task"] == "caption"
    assert manifest["version"] == mplug_ds.__version__
    assert manifest["shards"] == [{"name": "demo-000000.tar", "samples": 2}, {"name": "demo-000001.tar", "samples": 1}]
    assert manifest["total_samples"] == 3 and manifest["skipped"] == 0 and manifest["inputs"] == [str(ann)]
    with tarfile.open(tmp_path / "out" / "demo-000000.tar") as tar:
        assert tar.getnames() == ["albef_img0.jpg", "albef_img0.json", "albef_img1.jpg", "albef_img1.json"]
        meta = json.loads(tar.extractfile("albef_img0.json").read())
    assert meta["texts"] == ["caption number 0"] and "image" not in meta


def test_resize_shrinks_images_and_scales_boxes(tmp_path, shards):
    shards.image(tmp_path / "img" / "VG_100K" / "1.jpg", size=(80, 60))
    regions = shards.json(tmp_path / "region_descriptions.json", [{"id": 1, "regions": [
        {"region_id": 1, "x": 10, "y": 20, "width": 40, "height": 20, "image_id": 1, "phrase": "a box"}]}])
    assert shards.run("--format", "vg-regions", "--ann", regions, "--images", tmp_path / "img",
                      "--out", tmp_path / "out", "--resize", "40") == 0
    (sample,) = shards.read(tmp_path / "out").values()
    assert sample.image.size == (40, 30) and sample.boxes == [[5, 10, 25, 20]]


def test_workers_produce_identical_shards(tmp_path, shards):
    ann = shards.json(tmp_path / "train.json", _albef_dataset(tmp_path, shards, n=5))
    for workers in ("0", "2"):
        assert shards.run("--format", "albef", "--ann", ann, "--images", tmp_path / "img", "--shard-size", "3",
                          "--out", tmp_path / f"out{workers}", "--workers", workers, "--resize", "20") == 0
    for name in ("albef-000000.tar", "albef-000001.tar"):
        assert (tmp_path / "out0" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()


def test_duplicate_keys_are_reported(tmp_path, shards):
    shards.image(tmp_path / "img" / "a.jpg")
    rows = [{"image": "1.jpg", "question": "q?", "question_id": 7, "dataset": "vg", "answer": "x"},
                  {"image": "a.jpg", "question": "again?", "question_id": 7, "dataset": "vg", "answer": "y"}]
    shards.image(tmp_path / "img" / "1.jpg")
    ann = shards.json(tmp_path / "vg_qa.json", rows)
    assert shards.run("--format", "mplug-vqa", "--ann", ann, "--images", tmp_path / "img",
                      "--out", tmp_path / "out") == 0
    assert [s.texts for s in shards.read(tmp_path / "out").values()] == [["q?"]]
    (skip,) = shards.skipped(tmp_path / "out")
    assert skip["key"] == "vg_q_7" and skip["reason"] == "duplicate key"


@pytest.mark.parametrize("content, problem", [(None, "file not found"), ('[{"image": "a.jpg", "cap', "not valid JSON"),
                                              ('{"images": []}', "top level is a JSON dict")])
def test_unreadable_annotation_file_fails_naming_it(tmp_path, shards, content, problem):
    ann = tmp_path / "coco_train.json"
    if content is not None:
        ann.write_text(content)
    result = shards.cli("--format", "albef", "--ann", ann, "--images", tmp_path, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert str(ann) in result.stderr and problem in result.stderr and "Fix:" in result.stderr


def test_nothing_valid_exits_non_zero(tmp_path, shards):
    ann = shards.json(tmp_path / "train.json", [{"image": "missing.jpg", "caption": "no image here"}])
    result = shards.cli("--format", "albef", "--ann", ann, "--images", tmp_path, "--out", tmp_path / "out")
    assert result.returncode == 1
    assert "no valid albef samples" in result.stderr and "skipped.jsonl" in result.stderr
    assert shards.skipped(tmp_path / "out")[0]["reason"].startswith("missing image file")


def test_module_api_writes_shards_from_a_reader(tmp_path, shards):
    ann = shards.json(tmp_path / "train.json", _albef_dataset(tmp_path, shards, n=2))
    options = ShardOptions(out=tmp_path / "out", prefix="api", format_name="albef", progress=False)
    manifest = write_shards(read_format("albef", ReaderArgs(ann=[ann], images=tmp_path / "img"), ["train"]), options)
    assert manifest["total_samples"] == 2
    assert {s.split for s in shards.read(tmp_path / "out").values()} == {"train"}
