"""Skipped samples are reported per source in the step log, the summary and metrics.jsonl (2 ranks, real shards)."""
import pytest

from mplug_ds.data.sample import Sample
from tests.data.shard_utils import caption_sample, jpeg_bytes, write_shard
from tests.engine.engine_runs import deepspeed_command, records, run

STRIP = Sample(key="strip", task="caption", image=jpeg_bytes(20000, 3), texts=["an absurdly wide strip"])


def _shards(directory):
    """Source 'bad': 2 shards of 8 whose first two samples are a garbage JPEG and a 20000×3 strip; 'good': clean.
    Unshuffled, rank r reads bad-r then good-r, so its first batch comes after exactly those 2 skips."""
    for shard in range(2):
        bad = [Sample(**{**vars(STRIP), "key": f"strip{shard}"}), caption_sample(f"garbage{shard}", seed=shard)]
        bad += [caption_sample(f"b{shard}_{i}", seed=10 * shard + i) for i in range(6)]
        write_shard(directory / f"bad-{shard:06d}.tar", bad, corrupt_jpeg={f"garbage{shard}"})
        write_shard(directory / f"good-{shard:06d}.tar",
                    [caption_sample(f"g{shard}_{i}", seed=100 + 10 * shard + i) for i in range(8)])
    return (f"[{{name: bad, shards: '{directory}/bad-{{000000..000001}}.tar'}}, "
            f"{{name: good, shards: '{directory}/good-{{000000..000001}}.tar'}}]")


@pytest.mark.slow
def test_summary_and_metrics_report_skipped_samples_per_source(tmp_path):
    out = tmp_path / "run"
    output = run(deepspeed_command(out, [
        "--config", "synthetic_tiny", "data.source=shards", f"data.pipeline.sources={_shards(tmp_path)}",
        "data.pipeline.resampled=false", "data.pipeline.shard_shuffle=false", "data.pipeline.shuffle_buffer=1",
        "data.pipeline.num_workers=1", "schedule.total_steps=3", "schedule.warmup_steps=1", "logging.every_steps=1",
        "eval.retrieval=false", "logging.progress_bar=false"]))
    steps = {r["step"]: r for r in records(out) if r["event"] == "step"}
    # Step 1: each rank read its 2 skips + 4 good samples of bad-r. Step 3: all 8 of bad-r and 6 of good-r.
    assert steps[1]["skipped"]["bad"] == {"read": 12, "corrupt_samples": 4, "damaged_shards": 0,
                                          "skipped_fraction": 4 / 12}
    assert steps[3]["skipped"] == {
        "bad": {"read": 16, "corrupt_samples": 4, "damaged_shards": 0, "skipped_fraction": 0.25},
        "good": {"read": 12, "corrupt_samples": 0, "damaged_shards": 0, "skipped_fraction": 0.0}}
    summary = [r for r in records(out) if r["event"] == "summary"][-1]
    assert summary["steps"] == 3 and summary["skipped_samples"] == steps[3]["skipped"]
    assert "skipped bad 4/12, good 0/0" in output  # the step 1 progress line
    assert "samples skipped (corrupt, unreadable or oversized; skipped/read per source): bad 4/16 (25.0%), " \
           "good 0/12 (0.0%)" in output
    warning = "WARNING: data source 'bad' skipped 4 of 16 samples read (25.0%, above data.pipeline.warn_skipped_fraction=0.01)"
    assert warning.replace("16", "12").replace("25.0%", "33.3%") in output  # as soon as it was crossed
    assert output.rsplit("=== pre-training summary ===", 1)[1].count(warning) == 1
    assert [r for r in records(out) if r["event"] == "warning"]
