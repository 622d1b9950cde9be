"""Every on-disk format: a tiny fixture in that exact format → real make_shards CLI → shards read back by the
pipeline, checking captions, answers with weights, boxes (xyxy pixels), labels, splits and keys."""
from __future__ import annotations

import io
import json
import pickle
import tarfile

import pytest
import torch
from PIL import Image

RED, GREEN, BLUE = (200, 30, 30), (30, 160, 40), (30, 40, 200)


def pixel(image: Image.Image) -> tuple[int, int, int]:
    return image.getpixel((image.width // 2, image.height // 2))


def close(color: tuple[int, ...], expected: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 12 for a, b in zip(color, expected))


def test_albef_merges_rows_per_image_and_labels_split(tmp_path, shards):
    shards.image(tmp_path / "img" / "train2014" / "COCO_train2014_000000000042.jpg", color=RED)
    absolute = shards.image(tmp_path / "elsewhere" / "7.jpg", color=GREEN)
    train = shards.json(tmp_path / "coco_train.json", [
        {"image": "train2014/COCO_train2014_000000000042.jpg", "caption": "A dog on a couch. ", "image_id": "coco_42"},
        {"image": "train2014/COCO_train2014_000000000042.jpg", "caption": "a sleeping dog", "image_id": "coco_42"},
    ])
    pretrain = shards.json(tmp_path / "vg.json", [{"image": str(absolute), "caption": ["a window", "white clouds"]}])
    assert shards.run("--format", "albef", "--ann", train, pretrain, "--images", tmp_path / "img",
                      "--out", tmp_path / "out", "--split", "train") == 0
    samples = shards.read(tmp_path / "out")
    coco = samples["albef_train2014_COCO_train2014_000000000042"]
    assert coco.task == "caption" and coco.texts == ["A dog on a couch.", "a sleeping dog"]
    assert coco.image_id == "coco_42" and coco.split == "train" and close(pixel(coco.image), RED)
    vg = next(s for k, s in samples.items() if k.endswith("elsewhere_7"))
    assert vg.texts == ["a window", "white clouds"] and close(pixel(vg.image), GREEN)
    assert shards.manifest(tmp_path / "out")["task"] == "caption"


def test_coco_captions_official_json(tmp_path, shards):
    shards.image(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000005.jpg", size=(64, 48))
    shards.image(tmp_path / "coco" / "COCO_val2014_000000000009.jpg", color=BLUE)
    ann = shards.json(tmp_path / "annotations" / "captions_val2014.json", {
        "info": {"description": "COCO 2014 Dataset", "year": 2014},
        "licenses": [{"url": "http://x", "id": 1, "name": "l"}],
        "images": [{"license": 1, "file_name": "COCO_val2014_000000000005.jpg", "coco_url": "http://x/5.jpg",
                    "height": 48, "width": 64, "date_captured": "2013-11-14 11:18:45", "flickr_url": "http://f",
                    "id": 5},
                   {"license": 1, "file_name": "COCO_val2014_000000000009.jpg", "coco_url": "http://x/9.jpg",
                    "height": 30, "width": 40, "date_captured": "2013-11-14 11:18:45", "flickr_url": "http://f",
                    "id": 9}],
        "annotations": [{"image_id": 5, "id": 700001, "caption": "A man riding a bike. \n"},
                        {"image_id": 9, "id": 700002, "caption": "A blue wall."},
                        {"image_id": 5, "id": 700003, "caption": "Bike on a road."}]})
    assert shards.run("--format", "coco-captions", "--ann", ann, "--images", tmp_path / "coco",
                      "--out", tmp_path / "out") == 0
    samples = shards.read(tmp_path / "out")
    assert samples["coco_000000000005"].texts == ["A man riding a bike.", "Bike on a road."]
    assert samples["coco_000000000005"].image.size == (64, 48)
    assert samples["coco_000000000009"].split == "val2014" and samples["coco_000000000009"].image_id == "9"


def _karpathy_entry(cocoid, split, filepath="val2014", raws=("A man riding a bike. ", "Bike on a road.")):
    filename = f"COCO_{filepath}_{cocoid:012d}.jpg"
    return {"filepath": filepath, "sentids": list(range(len(raws))), "filename": filename, "imgid": cocoid,
            "split": split, "cocoid": cocoid,
            "sentences": [{"tokens": r.lower().split(), "raw": r, "imgid": cocoid, "sentid": i}
                          for i, r in enumerate(raws)]}


def test_coco_karpathy_split_selection_and_mplug_array(tmp_path, shards):
    for cocoid, folder in ((1, "train2014"), (2, "val2014"), (3, "val2014"), (4, "val2014")):
        shards.image(tmp_path / "coco" / folder / f"COCO_{folder}_{cocoid:012d}.jpg")
    ann = shards.json(tmp_path / "dataset_coco.json", {"images": [
        _karpathy_entry(1, "train", "train2014"), _karpathy_entry(2, "restval"), _karpathy_entry(3, "val"),
        _karpathy_entry(4, "test", raws=("Two dogs.",))], "dataset": "coco"})
    assert shards.run("--format", "coco-karpathy", "--ann", ann, "--images", tmp_path / "coco",
                      "--out", tmp_path / "train", "--split", "train,restval") == 0
    train = shards.read(tmp_path / "train")
    assert sorted(train) == ["coco_000000000001", "coco_000000000002"]
    assert train["coco_000000000002"].texts == ["A man riding a bike.", "Bike on a road."]
    assert train["coco_000000000002"].split == "restval"
    assert train["coco_000000000002"].extra["filename"] == "COCO_val2014_000000000002.jpg"
    assert shards.manifest(tmp_path / "train")["shards"][0]["name"] == "coco-karpathy-train_restval-000000.tar"

    mplug = shards.json(tmp_path / "coco_caption_test_ocr.json",
                        [{**_karpathy_entry(4, "test", raws=("Two dogs.",)), "object_label": "dog&&dog"}])
    assert shards.run("--format", "coco-karpathy", "--ann", mplug, "--images", tmp_path / "coco",
                      "--out", tmp_path / "test") == 0
    (test,) = shards.read(tmp_path / "test").values()
    assert test.texts == ["Two dogs."] and test.split == "test" and test.extra["object_label"] == "dog&&dog"


def test_vg_regions_with_image_data_folders(tmp_path, shards):
    shards.image(tmp_path / "vg" / "VG_100K_2" / "7.jpg", size=(80, 60))
    regions = shards.json(tmp_path / "region_descriptions.json", [{"id": 7, "regions": [
        {"region_id": 5001, "width": 20, "height": 10, "image_id": 7, "phrase": "a red car ", "y": 30, "x": 40},
        {"region_id": 5002, "width": 50, "height": 20, "image_id": 7, "phrase": "the sky", "y": -5, "x": 50}]}])
    image_data = shards.json(tmp_path / "image_data.json", [
        {"image_id": 7, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/7.jpg", "width": 80, "height": 60,
         "coco_id": None, "flickr_id": 123456}])
    assert shards.run("--format", "vg-regions", "--ann", image_data, regions, "--images", tmp_path / "vg",
                      "--out", tmp_path / "out") == 0
    (sample,) = shards.read(tmp_path / "out").values()
    assert sample.key == "vg_7" and sample.task == "region" and sample.image.size == (80, 60)
    assert sample.texts == ["a red car", "the sky"]
    assert sample.boxes == [[40, 30, 60, 40], [50, 0, 80, 15]]  # xywh → xyxy; second clipped to the image


def test_vg_objects_with_attributes(tmp_path, shards):
    shards.image(tmp_path / "vg" / "VG_100K" / "8.jpg", size=(50, 50))
    objects = shards.json(tmp_path / "objects.json", [{"image_id": 8, "image_url": "https://x/VG_100K/8.jpg",
                                                        "objects": [
        {"object_id": 1, "x": 5, "y": 6, "w": 10, "h": 12, "names": ["stove"], "synsets": ["stove.n.01"],
         "merged_object_ids": []},
        {"object_id": 2, "x": 20, "y": 20, "w": 5, "h": 5, "names": ["clock", "timer"], "synsets": []}]}])
    attributes = shards.json(tmp_path / "attributes.json", [{"image_id": 8, "attributes": [], "objects": [
        {"object_id": 1, "x": 5, "y": 6, "w": 10, "h": 12, "names": ["stove"], "attributes": ["black", "metal"]},
        {"object_id": 2, "x": 20, "y": 20, "w": 5, "h": 5, "names": ["clock"]}]}])
    assert shards.run("--format", "vg-objects", "--ann", objects, attributes, "--images", tmp_path / "vg",
                      "--out", tmp_path / "out") == 0
    (sample,) = shards.read(tmp_path / "out").values()
    assert sample.texts == ["black stove", "clock"]
    assert sample.boxes == [[5, 6, 15, 18], [20, 20, 25, 25]]


def test_xvlm_regions_strings_full_image_caption_and_merge(tmp_path, shards):
    image = shards.image(tmp_path / "img" / "vg" / "2345678.jpg", size=(120, 90))
    objects = shards.json(tmp_path / "vg_object.json", [
        '{"image": "vg/2345678.jpg", "elems": [{"bb": [12, 40, 30, 20], "caption": "stove", '
        '"attributes": ["black", "metal"]}]}'])
    regions = shards.json(tmp_path / "vg_region.json", [
        {"image": "vg/2345678.jpg", "caption": "a kitchen with a stove",
         "elems": [{"bb": [60, 5, 50, 80], "caption": ["window", "a window"]},
                   {"bb": [0, 0, 30, 30], "caption": {"en": "clock"}}]}])
    assert shards.run("--format", "xvlm-regions", "--ann", objects, regions, "--images", tmp_path / "img",
                      "--out", tmp_path / "out") == 0
    (sample,) = shards.read(tmp_path / "out").values()
    assert sample.image_id == image.stem
    assert sample.texts == ["black stove", "a kitchen with a stove", "window", "a window", "clock"]
    assert sample.boxes == [[12, 40, 42, 60], [0, 0, 120, 90], [60, 5, 110, 85], [60, 5, 110, 85], [0, 0, 30, 30]]


def json_bytes(data, **kwargs) -> bytes:
    return json.dumps(data, **kwargs).encode()


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _encoded(size, color, fmt) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def test_img2dataset_tar_and_files_output(tmp_path, shards):
    shard = tmp_path / "cc3m" / "00012.tar"
    shard.parent.mkdir()
    meta = {"caption": "from meta", "url": "http://example.com/img/123.jpg", "key": "000120005", "status": "success",
            "error_message": None, "width": 32, "height": 32, "original_width": 640, "original_height": 480,
            "exif": None, "sha256": "9f86"}
    with tarfile.open(shard, "w") as tar:
        _tar_member(tar, "000120005.jpg", _encoded((32, 32), RED, "JPEG"))
        _tar_member(tar, "000120005.json", json_bytes(meta, indent=4))
        _tar_member(tar, "000120005.txt", b"a person riding a bike on a dirt road")
        _tar_member(tar, "000120007.json", json_bytes({"caption": "png image, caption in meta only"}))
        _tar_member(tar, "000120007.png", _encoded((20, 10), BLUE, "PNG"))
    (tmp_path / "cc3m" / "00012_stats.json").write_text('{"count": 3, "successes": 2}')
    files = tmp_path / "sbu" / "00000"
    files.mkdir(parents=True)
    (files / "000000001.jpg").write_bytes(_encoded((16, 16), GREEN, "JPEG"))
    (files / "000000001.txt").write_text("a green square")
    assert shards.run("--format", "img2dataset", "--ann", shard, files, "--out", tmp_path / "out") == 0
    samples = shards.read(tmp_path / "out")
    assert samples["cc3m_000120005"].texts == ["a person riding a bike on a dirt road"]
    assert samples["cc3m_000120005"].extra["url"] == meta["url"]
    assert samples["cc3m_000120007"].texts == ["png image, caption in meta only"]
    assert close(pixel(samples["cc3m_000120007"].image), BLUE)
    assert samples["sbu_000000001"].texts == ["a green square"]
    with tarfile.open(tmp_path / "out" / shards.manifest(tmp_path / "out")["shards"][0]["name"]) as tar:
        stored = tar.extractfile("cc3m_000120007.jpg").read()
    assert stored[:2] == b"\xff\xd8"  # the PNG was re-encoded as JPEG


def _vqa_answers(words):
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]


def test_vqa_v2_official_files(tmp_path, shards):
    shards.image(tmp_path / "coco" / "train2014" / "COCO_train2014_000000012345.jpg")
    shards.image(tmp_path / "coco" / "test2015" / "COCO_test2015_000000000077.jpg")
    questions = shards.json(tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json", {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "train2014", "license": {},
        "questions": [{"image_id": 12345, "question": "What is the dog lying on?", "question_id": 12345001},
                      {"image_id": 12345, "question": "Is it sunny?", "question_id": 12345002}]})
    answers = ["couch"] * 6 + ["sofa", "couch", "sofa", "bed"]
    annotations = shards.json(tmp_path / "v2_mscoco_train2014_annotations.json", {
        "info": {}, "license": {}, "data_type": "mscoco", "data_subtype": "train2014", "annotations": [
            {"question_id": 12345001, "image_id": 12345, "question_type": "what is the", "answer_type": "other",
             "multiple_choice_answer": "couch", "answers": _vqa_answers(answers)},
            {"question_id": 12345002, "image_id": 12345, "question_type": "is it", "answer_type": "yes/no",
             "multiple_choice_answer": "yes", "answers": _vqa_answers(["yes"] * 10)}]})
    test = shards.json(tmp_path / "v2_OpenEnded_mscoco_test2015_questions.json", {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "test2015", "license": {},
        "questions": [{"image_id": 77, "question": "How many cats?", "question_id": 77000}]})
    assert shards.run("--format", "vqa-v2", "--ann", questions, annotations, test, "--images", tmp_path / "coco",
                      "--out", tmp_path / "out") == 0
    samples = shards.read(tmp_path / "out")
    first = samples["vqa_12345001"]
    assert first.task == "vqa" and first.texts == ["What is the dog lying on?"]
    assert first.answers == ["couch", "sofa", "bed"] and first.answer_weights == pytest.approx([0.7, 0.2, 0.1])
    assert first.extra["all_answers"] == answers and first.split == "train2014" and first.image_id == "12345"
    assert samples["vqa_12345002"].answers == ["yes"] and samples["vqa_12345002"].answer_weights == [1.0]
    assert samples["vqa_77000"].answers == [] and samples["vqa_77000"].split == "test2015"


def test_mplug_vqa_rows_with_vg_root(tmp_path, shards):
    shards.image(tmp_path / "coco" / "train2014" / "COCO_train2014_000000012345.jpg")
    shards.image(tmp_path / "visual_genome" / "image" / "2345678.jpg", color=GREEN)
    ann = shards.json(tmp_path / "vqa_train_ocr.json", [
        {"question_id": 12345001, "question": "What is the dog lying on?",
         "image": "train2014/COCO_train2014_000000012345.jpg", "dataset": "vqa",
         "answer": ["couch", "couch", "sofa", "couch", "couch", "couch", "sofa", "couch", "bed", "couch"],
         "ocr": [[[0, 0], "EXIT"]], "object_label": "dog&&couch"},
        {"question_id": 900001, "question": "What color is the sky?", "answer": "blue", "image": "image/2345678.jpg",
         "dataset": "vg"}])
    assert shards.run("--format", "mplug-vqa", "--ann", ann, "--images", tmp_path / "coco",
                      "--root", f"vg={tmp_path / 'visual_genome'}", "--out", tmp_path / "out") == 0
    samples = shards.read(tmp_path / "out")
    vqa, vg = samples["vqa_q_12345001"], samples["vg_q_900001"]
    assert vqa.answers == ["couch", "sofa", "bed"] and vqa.answer_weights == pytest.approx([0.7, 0.2, 0.1])
    assert vqa.extra["ocr"] == ["EXIT"] and vqa.extra["object_label"] == "dog&&couch"
    assert vg.answers == ["blue"] and vg.answer_weights == [0.5] and close(pixel(vg.image), GREEN)


def _refer_fixture(tmp_path, shards):
    shards.image(tmp_path / "mscoco" / "train2014" / "COCO_train2014_000000012345.jpg", size=(200, 150))
    folder = tmp_path / "refer" / "refcoco+"
    shards.json(folder / "instances.json", {
        "images": [{"id": 12345, "file_name": "COCO_train2014_000000012345.jpg", "height": 150, "width": 200}],
        "annotations": [{"id": 98765, "image_id": 12345, "category_id": 1, "bbox": [10.5, 20.0, 50.25, 40.0],
                         "area": 2010.0, "iscrowd": 0, "segmentation": [[10, 20, 60, 20, 60, 60]]},
                        {"id": 98766, "image_id": 12345, "category_id": 18, "bbox": [120.0, 30.0, 60.0, 90.0],
                         "area": 5400.0, "iscrowd": 0, "segmentation": [[120, 30, 180, 30, 180, 120]]}],
        "categories": [{"supercategory": "person", "id": 1, "name": "person"},
                       {"supercategory": "animal", "id": 18, "name": "dog"}]})
    refs = [{"ref_id": 42, "ann_id": 98765, "image_id": 12345, "category_id": 1, "split": "testA",
             "file_name": "COCO_train2014_000000012345_7.jpg", "sent_ids": [501, 502],
             "sentences": [{"sent_id": 501, "raw": "Man on the left!", "sent": "man on the left",
                            "tokens": ["man", "on", "the", "left"]},
                           {"sent_id": 502, "raw": "left guy", "sent": "left guy", "tokens": ["left", "guy"]}]},
            {"ref_id": 43, "ann_id": 98766, "image_id": 12345, "category_id": 18, "split": "train",
             "file_name": "COCO_train2014_000000012345_8.jpg", "sent_ids": [503],
             "sentences": [{"sent_id": 503, "raw": "dog", "sent": "dog", "tokens": ["dog"]}]}]
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return folder


def test_refcoco_folder_with_dataset_and_split_by(tmp_path, shards):
    _refer_fixture(tmp_path, shards)
    assert shards.run("--format", "refcoco", "--ann", tmp_path / "refer", "--dataset", "refcoco+", "--split-by", "unc",
                      "--images", tmp_path / "mscoco", "--split", "testA", "--out", tmp_path / "out") == 0
    samples = shards.read(tmp_path / "out")
    assert sorted(samples) == ["refcocoplus_unc_r42_s501", "refcocoplus_unc_r42_s502"]
    sample = samples["refcocoplus_unc_r42_s501"]
    assert sample.task == "grounding" and sample.texts == ["man on the left"] and sample.split == "testA"
    assert sample.boxes == [[10.5, 20.0, 60.75, 60.0]] and sample.image.size == (200, 150)
    assert sample.extra["ann_id"] == 98765 and sample.image_id == "12345"


def test_refcoco_pickle_with_code_is_refused(tmp_path, shards):
    folder = _refer_fixture(tmp_path, shards)
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump([{"ref_id": 1, "callback": print}], f)
    result = shards.cli("--format", "refcoco", "--ann", folder / "refs(unc).p", folder / "instances.json",
                        "--images", tmp_path / "mscoco", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "refs(unc).p" in result.stderr and "refusing to load" in result.stderr


def test_transvg_pth_index_files(tmp_path, shards):
    shards.image(tmp_path / "ln_data" / "other" / "images" / "mscoco" / "images" / "train2014" /
                 "COCO_train2014_000000012345.jpg", size=(300, 200))
    shards.image(tmp_path / "ln_data" / "referit" / "images" / "8756.jpg", size=(100, 100))
    shards.image(tmp_path / "ln_data" / "Flickr30k" / "flickr30k_images" / "1000092795.jpg", size=(120, 80))
    torch.save([("COCO_train2014_000000012345.jpg", "98765.pth", [103.9, 50.0, 134.2, 100.4], "Man On The Left", [])],
               tmp_path / "unc_train.pth")
    torch.save([("8756.jpg", 3, [10.0, 20.0, 60.0, 70.0], "sky")], tmp_path / "referit_test.pth")
    torch.save([("1000092795.jpg", [5.0, 6.0, 50.0, 60.0], "two young guys")], tmp_path / "flickr_val.pth")
    assert shards.run("--format", "transvg", "--ann", tmp_path / "unc_train.pth", tmp_path / "referit_test.pth",
                      tmp_path / "flickr_val.pth", "--images", tmp_path / "ln_data", "--out", tmp_path / "out") == 0
    samples = shards.read(tmp_path / "out")
    unc = samples["unc_train_0000000"]
    assert unc.texts == ["man on the left"] and unc.boxes == [[103, 50, 237, 150]] and unc.split == "train"
    assert samples["referit_test_0000000"].boxes == [[10, 20, 60, 70]]
    assert samples["flickr_val_0000000"].boxes == [[5, 6, 50, 60]]
    assert samples["flickr_val_0000000"].image.size == (120, 80)


def test_nlvr2_official_lines_and_albef_array(tmp_path, shards):
    root = tmp_path / "nlvr2"
    shards.image(root / "images" / "train" / "37" / "train-4521-2-img0.png", color=RED, fmt="PNG")
    shards.image(root / "images" / "train" / "37" / "train-4521-2-img1.png", color=BLUE, fmt="JPEG")  # JPEG as .png
    shards.image(root / "dev" / "dev-12-0-img0.png", color=GREEN, fmt="PNG")
    shards.image(root / "dev" / "dev-12-0-img1.png", color=GREEN, fmt="PNG")
    row = {"sentence": "Both images show exactly two dogs.", "writer": "12", "synset": "dog", "query": "two dogs3",
           "left_url": "http://example.com/a.jpg", "right_url": "http://example.com/b.jpg",
           "validation": {"12": "True"}, "extra_validations": {}}
    train = shards.jsonl(root / "train.json", [
        {**row, "identifier": "train-4521-2-0", "label": "True", "directory": 37},
        {**row, "identifier": "train-4521-2-1", "label": "False", "directory": 37, "sentence": "There is a cat."}])
    assert shards.run("--format", "nlvr2", "--ann", train, "--images", root, "--out", tmp_path / "out") == 0
    samples = shards.read(tmp_path / "out")
    first, second = samples["nlvr2_train-4521-2-0"], samples["nlvr2_train-4521-2-1"]
    assert first.task == "nlvr2" and first.label == 1 and second.label == 0 and first.split == "train"
    assert close(pixel(first.images[0]), RED) and close(pixel(first.images[1]), BLUE)

    albef = shards.json(tmp_path / "nlvr_dev.json", [
        {"images": ["dev/dev-12-0-img0.png", "dev/dev-12-0-img1.png"], "sentence": "Both are green.", "label": "True"}])
    assert shards.run("--format", "nlvr2", "--ann", albef, "--images", root, "--out", tmp_path / "dev") == 0
    (dev,) = shards.read(tmp_path / "dev").values()
    assert dev.label == 1 and dev.texts == ["Both are green."] and close(pixel(dev.images[1]), GREEN)


def test_snli_ve_lines_labels_and_no_consensus_rows(tmp_path, shards):
    shards.image(tmp_path / "flickr" / "flickr30k-images" / "123456789.jpg")
    base = {"Flickr30K_ID": "123456789", "captionID": "123456789.jpg#2", "sentence1": "A dog runs.",
            "sentence1_binary_parse": "( ( A dog ) runs )", "sentence1_parse": "(ROOT (S (NP A dog) (VP runs)))",
            "sentence2_binary_parse": "...", "sentence2_parse": "..."}
    rows = [{**base, "annotator_labels": ["neutral"], "gold_label": "neutral", "pairID": "123456789.jpg#2r1n",
             "sentence2": "The dog is chasing a cat."},
            {**base, "annotator_labels": ["entailment"], "gold_label": "entailment", "pairID": "123456789.jpg#2r1e",
             "sentence2": "An animal moves."},
            {**base, "annotator_labels": ["contradiction"], "gold_label": "contradiction",
             "pairID": "123456789.jpg#2r1c", "sentence2": "The dog sleeps."},
            {**base, "annotator_labels": ["neutral", "entailment"], "gold_label": "-", "pairID": "123456789.jpg#2r2n",
             "sentence2": "Unclear."}]
    ann = shards.jsonl(tmp_path / "snli_ve_dev.jsonl", [dict(sorted(r.items())) for r in rows])
    assert shards.run("--format", "snli-ve", "--ann", ann, "--images", tmp_path / "flickr",
                      "--out", tmp_path / "out") == 0
    samples = shards.read(tmp_path / "out")
    labels = {s.texts[0]: s.label for s in samples.values()}
    assert labels == {"The dog is chasing a cat.": 1, "An animal moves.": 2, "The dog sleeps.": 0}
    assert {s.split for s in samples.values()} == {"dev"}
    assert samples["ve_123456789_jpg_2r1e"].extra["premise"] == "A dog runs."
    (skip,) = shards.skipped(tmp_path / "out")
    assert skip["key"] == "line 4" and "'-'" in skip["reason"] and skip["source"].endswith("snli_ve_dev.jsonl")
