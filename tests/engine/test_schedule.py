"""AdamW parameter groups and the per-optimizer-step warm-up + cosine schedule."""
import math

import pytest
import torch
from torch import nn

from mplug_ds.engine.schedule import WarmupCosine, group_lr, param_groups
from mplug_ds.engine.train_config import OptimSection, ScheduleSection
from mplug_ds.models.mplug import build_model


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = nn.ModuleDict({"proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})
        self.visual.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.embeddings = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.frozen = nn.Linear(4, 4).requires_grad_(False)


def _groups(model):
    optim = OptimSection(lr=1e-4, visual_lr=1e-5, weight_decay=0.05)
    groups = param_groups(model, optim)
    named = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: (g, sorted(named[id(p)] for p in g["params"])) for g in groups}


def test_groups_split_visual_lr_and_decay():
    groups = _groups(Toy())
    assert groups["visual_decay"][1] == ["visual.proj.weight"]
    assert groups["visual_no_decay"][1] == ["visual.norm.bias", "visual.norm.weight", "visual.pos_embed",
                                            "visual.proj.bias"]
    assert groups["rest_decay"][1] == ["head.weight"]
    assert groups["rest_no_decay"][1] == ["embeddings.weight", "head.bias", "temp"]
    assert groups["visual_decay"][0]["lr"] == 1e-5 and groups["rest_decay"][0]["lr"] == 1e-4
    assert groups["rest_no_decay"][0]["weight_decay"] == 0.0 and groups["rest_decay"][0]["weight_decay"] == 0.05
    assert not any("frozen" in n for _, names in groups.values() for n in names)


def test_groups_on_the_real_model_cover_every_trainable_parameter_once():
    model = build_model("tiny")
    groups = _groups(model)
    names = [n for _, ns in groups.values() for n in ns]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    no_decay = set(groups["rest_no_decay"][1]) | set(groups["visual_no_decay"][1])
    assert {"temp", "text_encoder.embeddings.word_embeddings.weight", "visual.vit.pos_embed",
            "visual.vit.cls_token"} <= no_decay
    assert all(n.startswith("visual.") for n in groups["visual_decay"][1] + groups["visual_no_decay"][1])


def test_warmup_then_cosine_per_optimizer_step():
    sched = WarmupCosine(ScheduleSection(total_steps=110, warmup_steps=10, warmup_lr=1e-6, min_lr=1e-6))
    base = 1e-4
    assert sched.lr(base, 0) == pytest.approx(1e-6)
    assert sched.lr(base, 5) == pytest.approx(1e-6 + (base - 1e-6) / 2)
    assert sched.lr(base, 10) == pytest.approx(base)
    assert sched.lr(base, 60) == pytest.approx(1e-6 + (base - 1e-6) * 0.5 * (1 + math.cos(math.pi / 2)))
    assert sched.lr(base, 110) == pytest.approx(1e-6)
    cosine = [sched.lr(base, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))


def test_apply_sets_each_group_from_its_own_peak():
    model = Toy()
    opt = torch.optim.AdamW(param_groups(model, OptimSection(lr=1e-4, visual_lr=1e-5)))
    sched = WarmupCosine(ScheduleSection(total_steps=100, warmup_steps=0, min_lr=0.0))
    sched.apply(opt, 50)
    assert group_lr(opt, visual=False) == pytest.approx(0.5e-4)
    assert group_lr(opt, visual=True) == pytest.approx(0.5e-5)
