"""Frames of a clip: which ones each sampling strategy picks, decoding them from a shard's bytes, and the clip's
transform (one crop for all frames, 8 bits until the model)."""
import random
import typing

import av
import numpy as np
import pytest
import torch

from mplug_ds.data.collate import Preparer, collate_video_qa
from mplug_ds.data.data_config import DataConfig
from mplug_ds.data.frames import STRATEGIES, FrameSampling, frame_indices
from mplug_ds.data.sample import Sample
from mplug_ds.data.transforms import TrainTransform, normalize_clip, to_normalized_tensor, transform_clip
from mplug_ds.data.video import PyAVDecoder, reencode
from tests.video_data import clip_bytes, write_avi, write_clip

LENGTHS = (1, 3, 7, 8, 20, 451)  # shorter than, equal to and longer than 8 frames


def test_the_config_literal_names_every_strategy():
    assert set(typing.get_args(FrameSampling)) == set(STRATEGIES)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("length", LENGTHS)
def test_every_strategy_gives_count_frames_in_order_inside_the_clip(strategy, length):
    for count in (1, 8):
        indices = frame_indices(length, count, strategy, random.Random(0))
        assert len(indices) == count and indices == sorted(indices)
        assert all(0 <= i < length for i in indices)


def test_linspace_spans_the_whole_clip_and_short_clips_repeat_evenly():
    assert frame_indices(100, 12, "linspace", random.Random(0)) == [0, 9, 18, 27, 36, 45, 54, 63, 72, 81, 90, 99]
    assert frame_indices(9, 1, "linspace", random.Random(0)) == [4]  # one frame: the middle one
    short = frame_indices(3, 8, "linspace", random.Random(0))
    assert set(short) == {0, 1, 2} and short.count(0) <= 3  # every frame used, no pile-up on frame 0


def test_segments_take_the_middle_or_a_random_frame_of_each_equal_part():
    assert frame_indices(100, 4, "segment_middle", random.Random(0)) == [12, 37, 62, 87]
    for seed in range(20):
        picked = frame_indices(100, 4, "segment_random", random.Random(seed))
        assert all(25 * s <= i < 25 * (s + 1) for s, i in enumerate(picked))
    assert len({tuple(frame_indices(100, 4, "segment_random", random.Random(s))) for s in range(5)}) > 1
    assert set(frame_indices(5, 8, "segment_middle", random.Random(0))) == set(range(5))


def test_mplug_uniform_reproduces_the_official_truncated_step():
    # video_tasks.md §1.2: np.arange(0, vlen, vlen / N, dtype=int)
    assert frame_indices(100, 12, "mplug_uniform", random.Random(0)) == list(range(0, 89, 8))
    assert frame_indices(95, 12, "mplug_uniform", random.Random(0)) == list(range(0, 78, 7))
    assert frame_indices(451, 16, "mplug_uniform", random.Random(0)) == list(range(0, 421, 28))
    assert frame_indices(10, 16, "mplug_uniform", random.Random(0)) == [0] * 16  # as published: frame 0 copies


def test_decoding_from_shard_bytes_equals_decoding_the_file(tmp_path):
    path = write_clip(tmp_path / "clip.mp4", frames=10)
    with av.open(str(path)) as container:  # the file, read by FFmpeg from disk
        from_file = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    picked = [0, 3, 9]
    from_bytes = PyAVDecoder().read(path.read_bytes(), lambda n: picked)
    assert len(from_file) == 10
    for image, index in zip(from_bytes, picked):
        assert np.array_equal(np.asarray(image), from_file[index])


def test_decoder_counts_frames_and_rejects_broken_videos(tmp_path):
    decoder = PyAVDecoder()
    data = clip_bytes(12)
    info = decoder.probe(data)
    assert (info.frames, info.width, info.height, info.codec) == (12, 32, 32, "h264")
    avi = write_avi(tmp_path / "clip.avi", 5).read_bytes()
    assert decoder.probe(avi).frames == 5 and len(decoder.read(avi, lambda n: list(range(n)))) == 5
    for broken, why in ((data[: len(data) // 2], "not a readable video"), (b"not a video", "not a readable video"),
                        (write_avi(tmp_path / "empty.avi", 0).read_bytes(), "no frames")):
        for call in (decoder.probe, lambda b: decoder.read(b, lambda n: [0])):
            with pytest.raises(ValueError, match=why):
                call(broken)
    with pytest.raises(ValueError, match="too large"):
        decoder.read(data, lambda n: [0], check_size=lambda w, h: (_ for _ in ()).throw(ValueError("too large")))


def test_reencode_shrinks_frames_and_keeps_every_frame():
    data, info = reencode(clip_bytes(9, size=64), 32)
    assert (info.frames, info.width, info.height) == (9, 32, 32)
    assert PyAVDecoder().probe(data).frames == 9


def test_a_clip_gets_one_transform_and_stays_8_bit_until_normalised():
    frames = [frame for frame in PyAVDecoder().read(clip_bytes(4, size=48), lambda n: list(range(n)))]
    out = transform_clip(frames, TrainTransform(32), random.Random(3))
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8
    rng = random.Random(3)  # frame 2 alone with the same draws: the same crop, flip and RandAugment
    assert torch.equal(normalize_clip(out[2]), to_normalized_tensor(TrainTransform(32).pil(frames[2], rng)))
    assert torch.equal(normalize_clip(out[2]), TrainTransform(32)(frames[2], random.Random(3)))


def test_video_qa_items_carry_the_clip_and_its_questions():
    sample = Sample(key="v", task="video_qa", video=clip_bytes(10), texts=["Which way?", "What colour?", "Why?"],
                    answers=["right", "red", "no"], answer_weights=[1.0, 1.0, 1.0],
                    extra={"question_ids": [7, 8, 9], "answer_types": ["direction", "color", "other"]})
    cfg = DataConfig(task="video_qa", train=True, image_res=32, patch_size=16, num_frames=4, questions_per_video=2,
                     scale_min=1.0, augment=False)
    item = Preparer(cfg)(sample, random.Random(0))
    assert item["video"].shape == (4, 3, 32, 32) and item["video"].dtype == torch.uint8
    assert len(item["questions"]) == 2 and {q["question_id"] for q in item["questions"]} <= {7, 8, 9}
    video = item["video"].float()  # the red square moves right: the mean column of its pixels grows
    columns = [((frame[0] - frame[1]) > 100).nonzero()[:, 1].float().mean().item() for frame in video]
    assert columns == sorted(columns) and columns[-1] > columns[0]
    batch = collate_video_qa([item, Preparer(cfg)(sample, random.Random(1))], max_len=12)
    assert batch["video"].shape == (2, 4, 3, 32, 32) and batch["question_video"].tolist() == [0, 0, 1, 1]
    assert batch["question_ids"].shape[0] == 4 and batch["answer_counts"].tolist() == [1, 1, 1, 1]
    every = Preparer(DataConfig(task="video_qa", train=False, image_res=32, patch_size=16, num_frames=4))(
        sample, random.Random(0))
    assert [q["question_id"] for q in every["questions"]] == [7, 8, 9]  # evaluation: all questions, in order


@pytest.mark.slow
def test_benchmark_data_reports_videos_and_frames_per_second(tmp_path):
    import sys

    from tests.processes import REPO, run_checked
    from tests.video_data import write_video_shards

    shards = write_video_shards(tmp_path, "video_caption", [4, 4])
    out = run_checked([sys.executable, REPO / "tools" / "benchmark_data.py", "--shards", shards, "--workers", "1",
                       "--batches", "2", "--batch-size", "2", "--res", "32", "--frames", "4"], 120)
    assert "4 frames per clip" in out and "videos/s" in out and "frames/s) per worker" in out
