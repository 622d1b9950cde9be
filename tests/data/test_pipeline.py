"""Streaming loader: damaged input, rank/worker splitting, exact restore, mixing, collation with the real tokenizer."""
from __future__ import annotations

import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from shard_utils import caption_sample, jpeg_bytes, truncate, write_caption_shards, write_manifest, write_shard

from mplug_ds.config import ConfigError, from_dict, load_config
from mplug_ds.data.collate import collate_caption, split_prefix
from mplug_ds.data.data_config import DataConfig
from mplug_ds.data.pipeline import build_loader
from mplug_ds.data.reading import DataErrors, iter_samples
from mplug_ds.data.sample import Sample
from mplug_ds.data.tokenizer import CLS_ID, PAD_ID, SEP_ID, get_tokenizer
from tests.processes import REPO, run_checked

SMALL = {"image_res": 32, "patch_size": 16, "shuffle_buffer": 8, "shuffle_initial": 4}


def data_config(sources: list[dict], **kw) -> DataConfig:
    return from_dict(DataConfig, {"sources": sources, **SMALL, **kw})


def damaged_shards(tmp_path: Path) -> tuple[str, list[str]]:
    """Shard 0: one bad JPEG and one bad JSON; shard 1: cut short; shard 2: intact. Returns pattern + good keys."""
    write_shard(tmp_path / "d-000000.tar", [caption_sample(f"a{i}", seed=i) for i in range(5)],
                corrupt_jpeg={"a1"}, corrupt_json={"a3"})
    write_shard(tmp_path / "d-000001.tar", [caption_sample(f"b{i}", seed=10 + i, width=200, height=160)
                                            for i in range(6)])
    truncate(tmp_path / "d-000001.tar", 0.5)
    write_shard(tmp_path / "d-000002.tar", [caption_sample(f"c{i}", seed=20 + i) for i in range(4)])
    return f"{tmp_path}/d-{{000000..000002}}.tar", ["a0", "a2", "a4"] + [f"c{i}" for i in range(4)]


def test_iter_samples_skips_counts_and_names_damage(tmp_path):
    pattern, good = damaged_shards(tmp_path)
    errors = DataErrors()
    samples = list(iter_samples(pattern, errors))
    keys = [s.key for s in samples]
    assert [k for k in keys if not k.startswith("b")] == good  # carried on past the damaged shard
    assert 0 < sum(k.startswith("b") for k in keys) < 6  # the intact head of the cut shard is kept
    assert all(s.image.mode == "RGB" and s.image.size in ((48, 40), (200, 160)) for s in samples)
    assert errors.damaged_shards == 1 and list(errors.shards) == [f"{tmp_path}/d-000001.tar"]
    assert "truncated" in errors.shards[f"{tmp_path}/d-000001.tar"]
    assert f"{tmp_path}/d-000000.tar#a1" in errors.samples and "jpg" in errors.samples[f"{tmp_path}/d-000000.tar#a1"]
    assert f"{tmp_path}/d-000000.tar#a3" in errors.samples and "json" in errors.samples[f"{tmp_path}/d-000000.tar#a3"]
    assert errors.corrupt_samples == len(errors.samples) >= 2


def test_loader_workers_report_damage_to_the_main_process(tmp_path):
    pattern, good = damaged_shards(tmp_path)
    cfg = data_config([{"name": "d", "shards": pattern}], resampled=False, train=False, batch_size=2,
                      num_workers=2, drop_last=False)
    loader = build_loader(cfg, rank=0, world_size=1)
    keys = [k for batch in loader for k in batch["keys"]]
    assert set(good) <= set(keys) and len(keys) == len(set(keys))
    assert loader.errors.damaged_shards == 1 and f"{tmp_path}/d-000001.tar" in loader.errors.shards
    assert {f"{tmp_path}/d-000000.tar#a1", f"{tmp_path}/d-000000.tar#a3"} <= set(loader.errors.samples)


def test_absurd_and_oversized_images_are_skipped_counted_and_named_per_source(tmp_path):
    """A 20000×3 JPEG (which used to crash the crop with DecompressionBombError) and an image over the configured
    pixel limit are skipped like corrupt samples and counted under their source."""
    strip = Sample(key="strip", task="caption", image=jpeg_bytes(20000, 3), texts=["a very wide strip"])
    big = Sample(key="big", task="caption", image=jpeg_bytes(300, 300), texts=["a big image"])
    write_shard(tmp_path / "odd-000000.tar", [strip, big] + [caption_sample(f"o{i}", seed=i) for i in range(4)])
    write_shard(tmp_path / "ok-000000.tar", [caption_sample(f"k{i}", seed=10 + i) for i in range(4)])
    cfg = data_config([{"name": "odd", "shards": f"{tmp_path}/odd-000000.tar"},
                       {"name": "ok", "shards": f"{tmp_path}/ok-000000.tar"}], resampled=False, batch_size=2,
                      num_workers=1, max_image_pixels=80_000)
    loader = build_loader(cfg, rank=0, world_size=1)
    keys = {k for batch in loader for k in batch["keys"]}
    assert keys == {f"o{i}" for i in range(4)} | {f"k{i}" for i in range(4)}
    errors = loader.errors
    assert errors.by_source == {"odd": {"read": 6, "corrupt_samples": 2, "damaged_shards": 0},
                                "ok": {"read": 4, "corrupt_samples": 0, "damaged_shards": 0}}
    assert "max_image_aspect=20" in errors.samples[f"{tmp_path}/odd-000000.tar#strip"]
    assert "max_image_pixels=80000" in errors.samples[f"{tmp_path}/odd-000000.tar#big"]


def test_non_resampled_two_ranks_two_workers_every_sample_once(tmp_path):
    pattern, keys = write_caption_shards(tmp_path, "cc", n_shards=8, per_shard=5)
    write_manifest(tmp_path, {f"cc-{i:06d}.tar": 5 for i in range(8)})
    cfg = data_config([{"name": "cc", "shards": pattern, "manifest": str(tmp_path / "manifest.json")}],
                      resampled=False, batch_size=3, num_workers=2, drop_last=False)
    for epoch in range(2):
        seen = []
        for rank in range(2):
            loader = build_loader(cfg, rank=rank, world_size=2)
            loader.set_epoch(epoch)
            expected_batches = len(loader)
            batches = list(loader)
            assert len(batches) == expected_batches
            seen += [k for b in batches for k in b["keys"]]
        assert sorted(seen) == sorted(keys)


def test_non_resampled_len_from_manifest_matches_batches(tmp_path):
    pattern, _ = write_caption_shards(tmp_path, "cc", n_shards=4, per_shard=5)
    manifest = write_manifest(tmp_path, {f"cc-{i:06d}.tar": 5 for i in range(4)})
    cfg = data_config([{"name": "cc", "shards": pattern, "manifest": str(manifest)}], resampled=False,
                      batch_size=2, num_workers=2, drop_last=True)
    loader = build_loader(cfg, rank=1, world_size=2)
    assert len(loader) == sum(1 for _ in loader) == 4  # 2 workers × 1 shard × ⌊5/2⌋


def test_resampled_restore_gives_the_uninterrupted_next_batches(tmp_path):
    pattern, _ = write_caption_shards(tmp_path, "cc", n_shards=3, per_shard=6, n_captions=3)
    write_shard(tmp_path / "cc-000003.tar", [caption_sample(f"x{i}", seed=99 + i) for i in range(6)],
                corrupt_jpeg={"x2"})
    cfg = data_config([{"name": "cc", "shards": f"{tmp_path}/cc-{{000000..000003}}.tar"}],
                      batch_size=3, num_workers=2, epoch_samples=60)
    reference = build_loader(cfg, rank=1, world_size=2)
    it = iter(reference)
    for _ in range(5):
        next(it)
    state = reference.state_dict()
    expected = [next(it) for _ in range(3)]
    del it

    restored = build_loader(cfg, rank=1, world_size=2)
    restored.load_state_dict(state)
    got = list(zip(range(3), restored))
    for (_, batch), want in zip(got, expected):
        assert batch["keys"] == want["keys"]
        for name in ("image", "text_ids", "prefix_ids", "target_ids", "target_mask"):
            assert torch.equal(batch[name], want[name]), name
    # the restored loader finishes the epoch after exactly the batches the interrupted one had left
    remaining = sum(1 for _ in restored)
    assert len(reference) == 10 and 5 + 3 + remaining == 10 and restored.epoch == 1


def test_restore_rejects_a_different_layout(tmp_path):
    pattern, _ = write_caption_shards(tmp_path, "cc", n_shards=2, per_shard=3)
    cfg = data_config([{"name": "cc", "shards": pattern}], batch_size=2, num_workers=2, epoch_samples=8)
    state = build_loader(cfg, rank=0, world_size=1).state_dict()
    other = build_loader(data_config([{"name": "cc", "shards": pattern}], batch_size=2, num_workers=1,
                                     epoch_samples=8), rank=0, world_size=1)
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(state)


def test_weighted_mixing_proportions(tmp_path):
    coco, _ = write_caption_shards(tmp_path, "coco", n_shards=2, per_shard=8, n_captions=1)
    sbu, _ = write_caption_shards(tmp_path, "sbu", n_shards=2, per_shard=8, n_captions=1)
    cfg = data_config([{"name": "coco", "shards": coco, "weight": 3.0}, {"name": "sbu", "shards": sbu, "weight": 1.0}],
                      batch_size=32, num_workers=0, epoch_samples=640, train=False)
    keys = [k for batch in build_loader(cfg, rank=0, world_size=1) for k in batch["keys"]]
    share = Counter(k.split("_")[0] for k in keys)
    assert len(keys) == 640
    assert abs(share["coco"] / len(keys) - 0.75) < 0.06


def test_prefix_split_property():
    rng = random.Random(0)
    for n in (1, 2, 5, 12):
        words = [f"w{i}" for i in range(n)]
        splits = set()
        for _ in range(200):
            prefix, target = split_prefix(words, rng)
            assert target.endswith(" [SEP]")
            target_words = target[: -len(" [SEP]")].split()
            assert prefix.split() + target_words == words and target_words
            splits.add(len(prefix.split()))
        assert splits == set(range(n))


def test_caption_collate_ids_with_real_tokenizer():
    items = [{"key": "k", "image": torch.zeros(3, 32, 32), "text": "a dog on a couch", "prefix": "",
              "target": "a dog on a couch [SEP]"},
             {"key": "m", "image": torch.ones(3, 32, 32), "text": "two cats", "prefix": "two",
              "target": "cats [SEP]"}]
    batch = collate_caption(items, max_len=12)
    tok = get_tokenizer()
    words = tok.convert_tokens_to_ids("a dog on a couch".split())
    assert batch["image"].shape == (2, 3, 32, 32)
    # padded to the batch's longest text (not to max_len)
    assert batch["text_ids"].shape == (2, 7) and batch["text_ids"].dtype == torch.long
    assert batch["text_ids"][0].tolist() == [CLS_ID, *words, SEP_ID]
    assert batch["text_ids"][1].tolist() == [CLS_ID, *tok.convert_tokens_to_ids(["two", "cats"]), SEP_ID] + [PAD_ID] * 3
    assert batch["prefix_ids"][0].tolist() == [CLS_ID, SEP_ID, PAD_ID]
    assert batch["target_ids"][0].tolist() == [CLS_ID, *words, SEP_ID, SEP_ID]
    assert batch["target_mask"][0].tolist() == [1] * 8
    cats = tok.convert_tokens_to_ids(["cats"])[0]
    assert batch["target_ids"][1, :4].tolist() == [CLS_ID, cats, SEP_ID, SEP_ID]
    long = collate_caption([dict(items[0], text="one two three four five six seven eight nine ten eleven")],
                           max_len=12)
    assert long["text_ids"].shape == (1, 12) and long["text_ids"][0, -1].item() == SEP_ID  # truncated at max_len


def test_caption_batches_from_shards_normalise_and_pick_one_caption(tmp_path):
    sample = Sample(key="k0", task="caption", image=jpeg_bytes(), texts=["A RED Bus!", "The (green) car."])
    write_shard(tmp_path / "c-000000.tar", [sample])
    cfg = data_config([{"name": "c", "shards": f"{tmp_path}/c-000000.tar"}], batch_size=1, num_workers=0,
                      epoch_samples=12, max_len=16)
    tok = get_tokenizer()
    texts = set()
    for batch in build_loader(cfg, rank=0, world_size=1):
        ids = batch["text_ids"][0][batch["text_mask"][0].bool()].tolist()
        texts.add(tok.decode(ids[1:-1]))
        assert batch["image"].shape == (1, 3, 32, 32)
    assert texts == {"a red bus", "the green car"}


def finetune_batch(tmp_path: Path, task: str, samples: list[Sample], **kw) -> dict:
    write_shard(tmp_path / f"{task}-000000.tar", samples)
    cfg = data_config([{"name": task, "shards": f"{tmp_path}/{task}-000000.tar"}], task=task, batch_size=len(samples),
                      num_workers=0, resampled=False, **kw)
    (batch,) = list(build_loader(cfg, rank=0, world_size=1))
    return batch


def test_vqa_collate(tmp_path):
    samples = [Sample(key="q1", task="vqa", image=jpeg_bytes(seed=1), texts=["What colour is the bus?"],
                      answers=["red", "dark red"], answer_weights=[0.7, 0.3], extra={"question_id": 11}),
               Sample(key="q2", task="vqa", image=jpeg_bytes(seed=2), texts=["Is it raining?"],
                      answers=["no"], answer_weights=[0.5])]
    batch = finetune_batch(tmp_path, "vqa", samples, train=False)
    tok = get_tokenizer()
    assert batch["question_ids"].shape == (2, 7) and batch["question_id"] == [11, "q2"]  # longest question
    assert tok.decode(batch["question_ids"][0][1:6]) == "what colour is the bus"
    assert batch["answer_counts"].tolist() == [2, 1]
    assert torch.allclose(batch["answer_weights"], torch.tensor([0.7, 0.3, 0.5]))
    assert batch["answer_ids"].shape == (3, 5)  # [CLS] dark red [SEP] [SEP]
    assert batch["answer_ids"][2, :4].tolist() == [CLS_ID, tok.convert_tokens_to_ids("no"), SEP_ID, SEP_ID]
    assert batch["answers"] == [["red", "dark red"], ["no"]]


def test_grounding_nlvr2_ve_collates(tmp_path):
    g = finetune_batch(tmp_path, "grounding", [Sample(key="g", task="grounding", image=jpeg_bytes(64, 32),
                                                      texts=["Man on the left"], boxes=[[0, 0, 32, 16]])], train=False)
    assert torch.allclose(g["box"], torch.tensor([[0.25, 0.375, 0.5, 0.25]]), atol=1e-3)
    assert g["image"].shape == (1, 3, 32, 32) and g["text_ids"][0, 0] == CLS_ID
    n = finetune_batch(tmp_path, "nlvr2", [Sample(key="n", task="nlvr2", images=[jpeg_bytes(seed=3), jpeg_bytes(seed=4)],
                                                  texts=["Both images show dogs."], label=1)], train=False)
    assert n["image0"].shape == n["image1"].shape == (1, 3, 32, 32) and n["label"].tolist() == [1]
    assert not torch.equal(n["image0"], n["image1"])
    v = finetune_batch(tmp_path, "ve", [Sample(key="v", task="ve", image=jpeg_bytes(), texts=["A dog sleeps."],
                                               label=2)], train=False)
    assert v["label"].tolist() == [2] and v["text_ids"].shape == (1, 5)


def test_region_batch_patch_labels(tmp_path):
    sample = Sample(key="r", task="region", image=jpeg_bytes(64, 64), texts=["whole picture", "a small cup", "a lamp"],
                    boxes=[[0, 0, 64, 64], [4, 4, 12, 12], [40, 40, 200, 200]])
    batch = finetune_batch(tmp_path, "region", [sample], train=True, max_regions=5)
    pairs = batch["region_text_ids"].shape[0]
    assert 2 <= pairs <= 3 and batch["patch_labels"].shape == (pairs, 4)
    assert batch["region_image_index"].tolist() == [0] * pairs
    tok = get_tokenizer()
    texts = [tok.decode(ids[1:m.sum() - 1]) for ids, m in zip(batch["region_text_ids"], batch["region_text_mask"])]
    labels = dict(zip(texts, batch["patch_labels"].tolist()))
    assert "a small cup" in labels and sum(labels["a small cup"]) >= 1
    if "whole picture" in labels:
        assert sum(labels["whole picture"]) >= sum(labels["a small cup"])


def test_config_loads_from_yaml_and_rejects_unknown_keys(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"name": "coco", "shards": "/s/coco-{000000..000009}.tar",
                                                 "weight": 2, "manifest": "/s/manifest.json"}],
                                    "batch_size": 8, "task": "caption"}))
    cfg = load_config(DataConfig, "data", path, ["resampled=false"])
    assert cfg.sources[0].weight == 2.0 and cfg.resampled is False and cfg.batch_size == 8
    with pytest.raises(ConfigError, match="shard_size"):
        load_config(DataConfig, "data", path, ["shard_size=3"])


@pytest.mark.slow
def test_benchmark_data_cli_reports_rates():
    out = run_checked([sys.executable, REPO / "tools" / "benchmark_data.py", "--workers", "1", "--batches", "2",
                       "--batch-size", "4", "--res", "32"], 120)
    assert "images/s total" in out and "per worker" in out


def test_positions_saved_by_two_ranks_continue_on_one(tmp_path):
    """Resampled: the next epoch starts on the new layout, deterministically, with every old rank's skip counts on
    rank 0."""
    pattern, keys = write_caption_shards(tmp_path, "cc", n_shards=4, per_shard=4)
    write_shard(tmp_path / "cc-000004.tar", [caption_sample(f"x{i}", seed=99 + i) for i in range(4)],
                corrupt_jpeg={"x1"})
    cfg = data_config([{"name": "cc", "shards": f"{tmp_path}/cc-{{000000..000004}}.tar"},
                       {"name": "x", "shards": str(tmp_path / "cc-000004.tar"), "weight": 4.0}],
                      batch_size=2, num_workers=1, epoch_samples=40)
    states = []
    for rank in range(2):
        loader = build_loader(cfg, rank=rank, world_size=2)
        for _, _ in zip(range(4), loader):
            pass
        states.append(loader.state_dict())
    skipped = sum(s["errors"]["corrupt_samples"] for s in states)
    assert skipped > 0
    first, again = (build_loader(cfg, rank=0, world_size=1) for _ in range(2))
    for loader in (first, again):
        loader.load_resharded(states)
    assert first.epoch == 1 and first.errors.corrupt_samples == skipped
    assert [b["keys"] for _, b in zip(range(3), first)] == [b["keys"] for _, b in zip(range(3), again)]



def _rows(batches):
    """key -> image of every sample in ``batches``."""
    return {key: batch["image"][i] for batch in batches for i, key in enumerate(batch["keys"])}


@pytest.mark.parametrize("old_ranks,new_ranks", [(2, 1), (1, 2)])
def test_non_resampled_epoch_finishes_exactly_on_another_number_of_ranks(tmp_path, old_ranks, new_ranks):
    """Every sample of the interrupted epoch is read exactly once, with the augmentation it would have had, whether
    the old streams are dealt out whole (2 -> 1) or shared by striding (1 -> 2); a position saved while finishing the
    carried epoch restores on the same number of ranks."""
    pattern, keys = write_caption_shards(tmp_path, "cc", n_shards=8, per_shard=5)
    cfg = data_config([{"name": "cc", "shards": pattern}], resampled=False, batch_size=2, num_workers=2,
                      drop_last=False)
    reference = {}
    for rank in range(old_ranks):
        reference |= _rows(list(build_loader(cfg, rank=rank, world_size=old_ranks)))
    assert sorted(reference) == sorted(keys)

    seen, states = [], []
    for rank in range(old_ranks):
        loader = build_loader(cfg, rank=rank, world_size=old_ranks)
        seen += [k for _, b in zip(range(3), loader) for k in b["keys"]]
        states.append(loader.state_dict())
    rest = {}
    for rank in range(new_ranks):
        loader = build_loader(cfg, rank=rank, world_size=new_ranks)
        loader.load_resharded(states)
        batches = [b for _, b in zip(range(2), loader)]
        restored = build_loader(cfg, rank=rank, world_size=new_ranks)
        restored.load_state_dict(loader.state_dict())  # a checkpoint taken while finishing the carried epoch
        batches += list(restored)
        assert restored.epoch == 1
        for key, image in _rows(batches).items():
            assert key not in rest, f"{key} read twice"
            rest[key] = image
    assert sorted(seen + list(rest)) == sorted(keys)  # nothing repeated, nothing skipped
    for key, image in rest.items():
        assert torch.equal(image, reference[key]), key


def test_non_resampled_positions_at_an_epoch_boundary_start_that_epoch(tmp_path):
    pattern, keys = write_caption_shards(tmp_path, "cc", n_shards=4, per_shard=3)
    cfg = data_config([{"name": "cc", "shards": pattern}], resampled=False, batch_size=2, num_workers=1,
                      drop_last=False)
    old = [build_loader(cfg, rank=rank, world_size=2) for rank in range(2)]
    for loader in old:
        list(loader)  # a whole epoch: the position is the start of epoch 1
    resumed = build_loader(cfg, rank=0, world_size=1)
    resumed.load_resharded([loader.state_dict() for loader in old])
    assert resumed.epoch == 1 and resumed.lanes is None
    assert sorted(k for b in resumed for k in b["keys"]) == sorted(keys)
