"""Every video format reader on a small fixture in its real layout, with a video that is missing, one cut short and
one without frames, plus malformed rows: the shards hold exactly the valid samples, and skipped.jsonl names the rest."""
import csv
import json
from pathlib import Path

import pytest

from mplug_ds.data.formats import ReaderArgs, read_format
from mplug_ds.data.reading import iter_samples
from mplug_ds.data.shards import ShardOptions, write_shards
from tests.video_data import write_avi, write_clip, write_truncated


def _videos(root: Path, names: dict[str, str], folder: str = "") -> None:
    """``names``: video file name → good | truncated | empty (missing ones are simply not written)."""
    for name, kind in names.items():
        path = root / folder / name
        if kind == "good":
            write_avi(path, 6) if path.suffix == ".avi" else write_clip(path, seed=len(name))
        elif kind == "truncated":
            write_truncated(path)
        elif kind == "empty":
            write_avi(path, 0)


def _shard(fmt: str, args: ReaderArgs, out: Path, splits=None) -> tuple[dict[str, object], dict[str, str]]:
    """Shard the format; (samples by key read back from the shards, skip reasons by key)."""
    manifest = write_shards(read_format(fmt, args, splits), ShardOptions(out=out, prefix=fmt, format_name=fmt,
                                                                         progress=False))
    samples = {s.key: s for s in iter_samples(str(out / "*.tar"))} if manifest["total_samples"] else {}
    skipped = {}
    for line in (out / "skipped.jsonl").read_text().splitlines():
        record = json.loads(line)
        skipped[record["key"]] = record["reason"]
    return samples, skipped


def _assert_broken_videos_skipped(skipped: dict[str, str], missing: str, truncated: str, empty: str) -> None:
    assert "missing video file" in skipped[missing]
    assert "corrupt video" in skipped[truncated] and "corrupt video" in skipped[empty]
    assert "no frames" in skipped[empty]


def _msrvtt_release(root: Path) -> Path:
    videos = [{"video_id": f"video{i}", "split": split, "id": i}
              for i, split in enumerate(["train", "test", "train", "validate", "test", "train"])]
    sentences = [{"video_id": f"video{i}", "caption": f"caption {j} of video {i}", "sen_id": 10 * i + j}
                 for i in range(5) for j in range(3)] + [{"video_id": "video5"}]  # a sentence without caption
    path = root / "MSRVTT_data.json"
    root.mkdir(parents=True)
    path.write_text(json.dumps({"info": {}, "videos": videos, "sentences": sentences}))
    _videos(root, {"video0.mp4": "good"}, "TrainValVideo")
    _videos(root, {"video1.mp4": "good", "video3.mp4": "truncated", "video4.avi": "empty"}, "TestVideo")
    return path  # video2: missing; video5: no caption


def test_msrvtt_release_splits(tmp_path):
    ann = _msrvtt_release(tmp_path / "msrvtt")
    samples, skipped = _shard("msrvtt", ReaderArgs(ann=[ann], images=tmp_path / "msrvtt"), tmp_path / "out")
    assert set(samples) == {"msrvtt_video0", "msrvtt_video1"}
    assert samples["msrvtt_video1"].split == "test" and samples["msrvtt_video1"].task == "video_caption"
    assert samples["msrvtt_video0"].texts == [f"caption {j} of video 0" for j in range(3)]
    assert samples["msrvtt_video0"].extra["video"]["frames"] == 8 and isinstance(samples["msrvtt_video0"].video, bytes)
    _assert_broken_videos_skipped(skipped, "msrvtt_video2", "msrvtt_video3", "msrvtt_video4")
    assert "missing field 'caption'" in skipped["sentences[15]"] and "no caption" in skipped["video5"]


def test_msrvtt_published_split_lists_give_the_1k_a_one_caption_protocol(tmp_path):
    ann = _msrvtt_release(tmp_path / "msrvtt")
    with open(tmp_path / "MSRVTT_train.9k.csv", "w", newline="") as f:
        csv.writer(f).writerows([["video_id"], ["video0"], ["video2"]])
    with open(tmp_path / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([["key", "vid_key", "video_id", "sentence"], ["ret0", "msr1", "video1", "a man sings"],
                                 ["ret1", "msr3", "video3", "a dog runs"]])
    args = ReaderArgs(ann=[ann], images=tmp_path / "msrvtt", split_files={
        "train": tmp_path / "MSRVTT_train.9k.csv", "test": tmp_path / "MSRVTT_JSFUSION_test.csv"})
    samples, skipped = _shard("msrvtt", args, tmp_path / "test", ["test"])
    assert set(samples) == {"msrvtt_video1"} and samples["msrvtt_video1"].texts == ["a man sings"]
    assert "corrupt video" in skipped["msrvtt_video3"]
    train, _ = _shard("msrvtt", args, tmp_path / "train", ["train"])
    assert set(train) == {"msrvtt_video0"} and len(train["msrvtt_video0"].texts) == 3


def test_video_text_rows_of_blip_and_lavis(tmp_path):
    root = tmp_path / "videos"
    _videos(root, {"video7.mp4": "good", "video8.mp4": "good", "video9.mp4": "truncated", "clipE.avi": "empty"})
    blip = tmp_path / "msrvtt_test.jsonl"
    rows = [{"clip_name": "video7", "caption": "a cat"}, {"clip_name": "video7", "caption": "a cat plays"},
            {"clip_name": "video9", "caption": "cut short"}, {"clip_name": "missing", "caption": "gone"}]
    blip.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    lavis = tmp_path / "retrieval_train.json"
    lavis.write_text(json.dumps([{"video": "video8.mp4", "caption": ["a dog", "a dog runs"]},
                                 {"video": "clipE.avi", "caption": "nothing"}, {"caption": "no video"}]))
    samples, skipped = _shard("video-text", ReaderArgs(ann=[blip, lavis], images=root), tmp_path / "out")
    assert set(samples) == {"video_test_video7", "video_train_video8"}
    cat = samples["video_test_video7"]
    assert cat.texts == ["a cat", "a cat plays"] and cat.split == "test"
    assert samples["video_train_video8"].texts == ["a dog", "a dog runs"]
    _assert_broken_videos_skipped(skipped, "video_test_missing", "video_test_video9", "video_train_clipE")
    assert "line 5" in skipped and "missing field 'video'" in skipped["[2]"]


def _qa_rows(videos: list, with_id: bool = True) -> list[dict]:
    rows = []
    for n, video in enumerate(videos):
        for q in range(2):
            rows.append({"question": f"what is {q} in {video}?", "answer": f"thing{q}", "video_id": video,
                         **({"id": 100 * n + q} if with_id else {})})
    return rows


def test_msrvtt_qa_original_groups_questions_per_video(tmp_path):
    root = tmp_path / "videos"
    _videos(root, {"video1.mp4": "good", "video2.mp4": "good", "video4.mp4": "truncated", "video5.avi": "empty"})
    rows = _qa_rows([1, 2, 3, 4, 5]) + [{"question": "no answer?", "id": 9, "video_id": 1}]
    (tmp_path / "test_qa.json").write_text(json.dumps(rows))
    samples, skipped = _shard("msrvtt-qa", ReaderArgs(ann=[tmp_path / "test_qa.json"], images=root), tmp_path / "o")
    assert set(samples) == {"msrvtt_qa_test_video1", "msrvtt_qa_test_video2"}
    video1 = samples["msrvtt_qa_test_video1"]
    assert video1.task == "video_qa" and video1.texts == ["what is 0 in 1?", "what is 1 in 1?"]
    assert video1.answers == ["thing0", "thing1"] and video1.answer_weights == [1.0, 1.0]
    assert video1.extra["question_ids"] == [0, 1] and video1.extra["answer_types"] == ["what", "what"]
    _assert_broken_videos_skipped(skipped, "msrvtt_qa_test_video3", "msrvtt_qa_test_video4", "msrvtt_qa_test_video5")
    assert "missing field 'answer'" in skipped["[10]"]


def test_msvd_qa_maps_video_ids_through_youtube_mapping(tmp_path):
    root = tmp_path / "YouTubeClips"
    _videos(root, {"abc_1_5.avi": "good", "def_2_9.avi": "truncated", "ghi_0_4.avi": "empty"})
    (tmp_path / "youtube_mapping.txt").write_text("abc_1_5 vid1\ndef_2_9 vid2\nghi_0_4 vid3\nmissing_0_1 vid4\n")
    (tmp_path / "train_qa.json").write_text(json.dumps(_qa_rows([1, 2, 3, 4, 7])))
    args = ReaderArgs(ann=[tmp_path / "train_qa.json", tmp_path / "youtube_mapping.txt"], images=root)
    samples, skipped = _shard("msvd-qa", args, tmp_path / "o")
    assert set(samples) == {"msvd_qa_train_abc_1_5"} and samples["msvd_qa_train_abc_1_5"].split == "train"
    assert samples["msvd_qa_train_abc_1_5"].extra["video"]["format"] == "avi"
    _assert_broken_videos_skipped(skipped, "msvd_qa_train_missing_0_1", "msvd_qa_train_def_2_9",
                                  "msvd_qa_train_ghi_0_4")
    assert "vid7" in skipped["[8]"]


def test_alpro_and_lavis_qa_rows(tmp_path):
    root = tmp_path / "videos"
    _videos(root, {"video1.mp4": "good", "video2.mp4": "good", "video3.mp4": "truncated", "video4.avi": "empty"})
    alpro = tmp_path / "test.jsonl"
    rows = [{**r, "video_id": f"video{r['video_id']}", "answer_type": "what"} for r in _qa_rows([1, 3, 4, 5], False)]
    alpro.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lavis = tmp_path / "qa_val.json"
    lavis.write_text(json.dumps([{"video": "video2.mp4", "question": "who?", "answer": "a man", "question_id": 42},
                                 {"video": "video2.mp4", "question": "why?"}]))
    samples, skipped = _shard("video-qa", ReaderArgs(ann=[alpro, lavis], images=root), tmp_path / "o")
    assert set(samples) == {"video_qa_test_video1", "video_qa_val_video2"}
    assert samples["video_qa_test_video1"].extra["question_ids"] == [0, 1]  # the line numbers, as ALPRO assigns
    val = samples["video_qa_val_video2"]
    assert val.texts == ["who?"] and val.extra["question_ids"] == [42] and val.extra["answer_types"] == ["who"]
    _assert_broken_videos_skipped(skipped, "video_qa_test_video5", "video_qa_test_video3", "video_qa_test_video4")


def test_vatex_captions_and_the_private_test_without_references(tmp_path):
    root = tmp_path / "vatex"
    _videos(root, {"aaa_000010_000020.mp4": "good", "bbb_000000_000010.mp4": "truncated",
                   "ccc_000005_000015.avi": "empty"})
    rows = [{"videoID": video, "enCap": [f"caption {i} of {video}" for i in range(10)], "chCap": ["中文"]}
            for video in ("aaa_000010_000020", "bbb_000000_000010", "ccc_000005_000015", "ddd_000000_000010")]
    (tmp_path / "vatex_training_v1.0.json").write_text(json.dumps(rows))
    private = tmp_path / "vatex_private_test_without_annotations.json"
    private.write_text(json.dumps([{"videoID": "aaa_000010_000020"}]))
    args = ReaderArgs(ann=[tmp_path / "vatex_training_v1.0.json", private], images=root)
    samples, skipped = _shard("vatex", args, tmp_path / "o")
    assert set(samples) == {"vatex_aaa_000010_000020"}
    sample = samples["vatex_aaa_000010_000020"]
    assert sample.split == "train" and len(sample.texts) == 10 and sample.image_id == "aaa_000010_000020"
    _assert_broken_videos_skipped(skipped, "vatex_ddd_000000_000010", "vatex_bbb_000000_000010",
                                  "vatex_ccc_000005_000015")
    assert "enCap" in skipped["[0]"]


@pytest.mark.parametrize("resize", [None, 16])
def test_videos_are_stored_as_they_are_or_re_encoded_smaller(tmp_path, resize):
    root = tmp_path / "videos"
    _videos(root, {"video1.mp4": "good", "video2.avi": "good"})
    (tmp_path / "test.jsonl").write_text(json.dumps({"clip_name": "video1", "caption": "a"}) + "\n"
                                         + json.dumps({"clip_name": "video2", "caption": "b"}) + "\n")
    manifest = write_shards(read_format("video-text", ReaderArgs(ann=[tmp_path / "test.jsonl"], images=root)),
                            ShardOptions(out=tmp_path / "o", prefix="v", format_name="video-text", resize=resize,
                                         progress=False))
    samples = {s.key: s for s in iter_samples(str(tmp_path / "o" / "*.tar"))}
    assert manifest["total_samples"] == 2
    if resize is None:  # the files' own bytes under their own container extension
        assert samples["video_test_video1"].video == (root / "video1.mp4").read_bytes()
        assert samples["video_test_video2"].video == (root / "video2.avi").read_bytes()
        assert samples["video_test_video2"].extra["video"]["format"] == "avi"
    else:
        for sample in samples.values():
            assert sample.extra["video"]["format"] == "mp4" and sample.extra["video"]["width"] == 16
