"""The best checkpoint (by the recipe's metric) survives keep-last-N pruning."""
import json

from mplug_ds.engine.checkpoint import COMPLETE, CheckpointManager, complete_checkpoints, tag_for


def _fake_checkpoint(directory, step):
    tag_dir = directory / tag_for(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / COMPLETE).write_text(json.dumps({"step": step}))
    return tag_dir


def test_pruning_keeps_the_best_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.best() is None
    manager.mark_best(_fake_checkpoint(tmp_path, 1), "acc", 0.7)
    for step in (2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    manager.prune()
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1, 3, 4]
    assert manager.best() == {"tag": tag_for(1), "step": 1, "metric": "acc", "value": 0.7}
    manager.mark_best(tmp_path / tag_for(4), "acc", 0.9)
    _fake_checkpoint(tmp_path, 5)
    manager.prune()
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [4, 5]
