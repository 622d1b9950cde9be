"""The loader at cluster scale, simulated in one process on sample indices (no shard is read, no image decoded).

512 ranks × 8 workers over 2,000 shards of a 10M-sample manifest: the split of a non-resampled epoch, a stop half-way
through it, the rest of that epoch on 384 ranks and the next epoch there, and the draws of a resampled stream.
What each stream reads comes from the loader's own ``epoch_segments`` and ``carry_lanes`` (what
``ShardLoader.load_resharded`` gives each new rank, checked for two of them); positions are in the format of the
``state_dict`` a checkpoint saves. The per-worker shuffle buffer is off: it permutes a
stream and is replayed identically on resume (tests/data/test_pipeline.py checks that on real shards).
"""
import json
import math
import pickle

import numpy as np
import pytest

from mplug_ds.data.data_config import DataConfig, SourceConfig
from mplug_ds.data.pipeline import ShardLoader, carry_lanes, epoch_segments, resampled_shards, shard_counts
from mplug_ds.data.reading import expand_urls

OLD_RANKS, NEW_RANKS, WORKERS, SHARDS, SAMPLES, BATCH = 512, 384, 8, 2000, 10_000_000, 32
URLS = "s3://cluster/shard-{000000..001999}.tar"  # remote URLs: never opened
STOP_AFTER = 300  # batches each rank consumed when the job stopped (an epoch is ~610 per rank)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """2,000 shards of 4,000-6,000 samples, 10M in all."""
    sizes = np.random.default_rng(0).integers(4000, 6001, SHARDS)
    short = SAMPLES - sizes.sum()
    sizes += short // SHARDS
    sizes[:short % SHARDS] += 1
    path = tmp_path_factory.mktemp("cluster") / "manifest.json"
    path.write_text(json.dumps({"shards": [{"name": f"shard-{i:06d}.tar", "samples": int(n)}
                                           for i, n in enumerate(sizes)]}))
    return path


def config(manifest, resampled=False):
    return DataConfig(sources=[SourceConfig("cluster", URLS, manifest=str(manifest))], resampled=resampled,
                      num_workers=WORKERS, batch_size=BATCH, shuffle_buffer=0, drop_last=False)


class Samples:
    """Global sample ids (shard's place in the manifest + position in the shard) of what streams read."""

    def __init__(self, cfg):
        self.cfg, self.counts = cfg, shard_counts(cfg)
        names = [u.rsplit("/", 1)[1] for u in expand_urls(cfg.sources[0].shards)]
        self.base = dict(zip(names, np.cumsum([0] + [self.counts[n] for n in names[:-1]])))

    def epoch(self, epoch, world):
        """Sample ids of every stream, by rank and worker."""
        streams = epoch_segments(self.cfg, epoch, world, WORKERS, self.counts)
        ids = [self.ids(segments) for segments in streams]
        return [ids[rank * WORKERS:(rank + 1) * WORKERS] for rank in range(world)]

    def ids(self, segments):
        parts = []
        for seg in segments:
            name = seg.url.rsplit("/", 1)[1]
            stop = self.counts[name] if seg.stop is None else seg.stop
            parts.append(np.arange(self.base[name] + seg.first, self.base[name] + stop))
        return np.concatenate(parts)


def once_each(*id_arrays):
    counts = np.bincount(np.concatenate(id_arrays), minlength=SAMPLES)
    return counts.size == SAMPLES and bool((counts == 1).all())


def stopped_positions(cfg, streams, resampled=False):
    """The positions ranks save after ``STOP_AFTER`` batches each, their workers taking turns (rank 0's real
    ``state_dict`` with each rank's numbers)."""
    template = ShardLoader(cfg, 0, OLD_RANKS).state_dict()
    states = []
    for rank in range(OLD_RANKS):
        positions = []
        for worker in range(WORKERS):
            batches = STOP_AFTER // WORKERS + (worker < STOP_AFTER % WORKERS)
            raw = batches * BATCH if resampled else min(batches * BATCH, len(streams[rank][worker]))
            positions.append([raw, batches])
        states.append({**template, "rank": rank, "received": STOP_AFTER, "batches": STOP_AFTER,
                       "positions": positions})
    return states


def test_an_epoch_at_512_ranks_and_its_resume_on_384_read_every_sample_once(manifest):
    cfg = config(manifest)
    samples = Samples(cfg)
    old = samples.epoch(0, OLD_RANKS)  # 4,096 streams over 2,000 shards: streams share shards by sample
    assert once_each(*[ids for rank in old for ids in rank])
    sizes = [len(ids) for rank in old for ids in rank]
    assert max(sizes) - min(sizes) <= 1  # 2,441 or 2,442 samples per stream

    states = stopped_positions(cfg, old)
    before = [ids[:state["positions"][w][0]] for rank, state in zip(old, states) for w, ids in enumerate(rank)]
    lanes = carry_lanes(states, NEW_RANKS, WORKERS, [[len(ids) for ids in rank] for rank in old])
    resumed_bytes = 0
    for rank in (0, NEW_RANKS - 1):
        loader = ShardLoader(cfg, rank, NEW_RANKS)
        loader.load_resharded(states)
        assert loader.lanes == lanes[rank]
        resumed_bytes = max(resumed_bytes, len(pickle.dumps(loader.state_dict())))
    after = [[old[lane.rank][lane.worker][lane.start:lane.stop][lane.offset::lane.stride] for lane in worker]
             for rank in lanes for worker in rank]
    per_worker = [sum(len(ids) for ids in worker) for worker in after]
    assert max(per_worker) - min(per_worker) <= 1  # the rest of the epoch, cut evenly over the 3,072 new workers
    after = [ids for worker in after for ids in worker]
    assert once_each(*before, *after)  # nothing lost, nothing read twice across the resume

    assert once_each(*[ids for rank in samples.epoch(1, NEW_RANKS) for ids in rank])  # the next epoch, on 384
    saved_bytes = max(len(pickle.dumps(state)) for state in states)
    print(f"\nposition state per rank: {saved_bytes} bytes saved at 512 ranks, {resumed_bytes} bytes on 384 ranks "
          f"finishing the epoch; rest of the epoch per new worker: {min(per_worker)}-{max(per_worker)} samples")
    assert saved_bytes < 2048 and resumed_bytes < 4096


def test_resampled_streams_stay_in_step_and_draw_shards_evenly(manifest):
    cfg = config(manifest, resampled=True)
    per_worker = {ShardLoader(cfg, rank, OLD_RANKS).batches_per_worker() for rank in (0, 1, OLD_RANKS - 1)}
    assert per_worker == {math.ceil(math.ceil(SAMPLES / (BATCH * OLD_RANKS)) / WORKERS)}  # the same on every rank
    urls = expand_urls(cfg.sources[0].shards)
    firsts = []
    for rank in range(OLD_RANKS):
        for worker in range(WORKERS):
            draws = resampled_shards(cfg.sources[0], urls, cfg.seed, 0, rank, worker)
            firsts.append(tuple(next(draws) for _ in range(10)))
    assert len(set(firsts)) == OLD_RANKS * WORKERS  # no two of the 4,096 workers read the same shard sequence
    where = {url: i for i, url in enumerate(urls)}
    hits = np.bincount([where[u] for seq in firsts for u in seq], minlength=SHARDS)
    assert hits.min() >= 3 and hits.max() <= 45  # ~20 draws per shard (binomial spread)
    states = stopped_positions(cfg, None, resampled=True)  # stopped inside epoch 0
    resumed = ShardLoader(cfg, 0, NEW_RANKS)
    resumed.load_resharded(states)  # drawn with replacement: nothing is owed, the next epoch starts on 384 ranks
    assert resumed.epoch == 1 and len(pickle.dumps(resumed.state_dict())) < 2048
