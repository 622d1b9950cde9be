"""``launch/pretrain.py --help`` lists every configuration key, generated from the typed config tree."""
import dataclasses
import re
import sys
import typing

from mplug_ds.config import to_dict
from mplug_ds.objectives.pretrain_config import TrainConfig, load_train_config
from mplug_ds.models.config import ModelConfig
from tests.engine.engine_runs import PRETRAIN
from tests.processes import run_checked


def tree_keys(cls, prefix=""):
    """Leaf keys of a dataclass tree, walked independently of the help generator."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys |= tree_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.add(f"{prefix}{f.name}")
            (item, *_) = typing.get_args(tp) or (None,)
            if dataclasses.is_dataclass(item):
                keys |= tree_keys(item, f"{prefix}{f.name}[].")
    return keys


def flatten(tree, prefix=""):
    out = set()
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "overrides":
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out.add(f"{prefix}{key}")
    return out


def test_help_lists_every_key_of_the_tree_with_type_default_and_meaning():
    output = run_checked([sys.executable, PRETRAIN, "--help"], 120)
    listed = {}
    for line in output.split("Configuration keys")[1].splitlines()[1:]:
        match = re.match(r"  (\S+)\s{2,}(\S+(?: \| \S+)*)\s{2,}(.+?)\s{2,}(\S.*)$", line)
        assert match, f"not a key line: {line!r}"
        listed[match.group(1)] = match.groups()[1:]
    expected = tree_keys(TrainConfig) | {f"model.overrides.{k}" for k in tree_keys(ModelConfig)}
    assert set(listed) == expected
    assert listed["batch.micro_batch_per_gpu"][:2] == ("int", "8")
    assert listed["deepspeed.precision"][:2] == ("{bf16,fp16,fp32}", "bf16")
    assert listed["objective.alpha"][0] == "float"  # the objective section is typed like the rest
    # Every key of a resolved run config (what config.yaml saves) is listed.
    assert flatten(to_dict(load_train_config("base"))) <= set(listed)
