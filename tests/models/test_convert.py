"""tools/convert_checkpoint.py on checkpoints in the released mPLUG layout (tiny; base and large shallow, slow)."""
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mplug_ds.engine.export import load_exported
from mplug_ds.models.config import load_model_config
from mplug_ds.models.hub import from_pretrained
from tests.models.official_layout import forward_outputs, map_by_hand, official_checkpoint
from tests.processes import REPO, child_env, timeout

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import convert_checkpoint  # noqa: E402


def _convert(capsys, src, out, *args):
    assert convert_checkpoint.main([str(src), str(out), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _check_model(tmp_path, capsys, name, image_size, overrides=()):
    """Official layout → converter → forward equals the by-hand mapping; one full model in memory at a time."""
    cfg = load_model_config(name, [f"vision.image_size={image_size}", *overrides])
    state = official_checkpoint(cfg, clip_text_width=768 if cfg.vision.width == 1024 else 512)
    src = tmp_path / "official.pth"
    torch.save({"model": state, "epoch": 29, "config": {"image_res": 256}}, src)
    n_keys = len(state)
    report = _convert(capsys, src, tmp_path / "out", "--model", name, "--image-size", str(image_size), *overrides)
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["mapped"] + len(report["dropped"]) == n_keys
    reasons = " | ".join(report["dropped"].values())
    for expected in ("CLIP text tower", "dead fusion layer", "momentum copy", "queue", "tied to"):
        assert expected in reasons
    for alias in ("text_decoder.cls.predictions.decoder.bias", "fusion_encoder.cls.predictions.decoder.bias"):
        assert alias in state and report["dropped"][alias].startswith("alias of ")  # every real release has it
    converted = from_pretrained(tmp_path / "out")
    got = forward_outputs(converted, image_size)
    if cfg.name == "tiny":  # what model.init_from reads (a second copy: tiny only)
        assert torch.equal(load_exported(tmp_path / "out").state_dict()["temp"], converted.temp)
    del converted
    gc.collect()
    reference = map_by_hand(state, cfg)
    want = forward_outputs(reference, image_size)
    del reference, state
    gc.collect()
    for key in want:
        diff = (got[key] - want[key]).abs().max().item()
        assert diff < 1e-5, f"{key}: max abs diff {diff}"
        assert want[key].abs().max() > 0


def test_tiny_official_layout(tmp_path, capsys):
    _check_model(tmp_path, capsys, "tiny", 64)


def test_tiny_with_visn_fc_and_momentum(tmp_path, capsys):
    """A ViT wider than the text (large's visn_fc path) and --keep-momentum writing the teacher."""
    cfg = load_model_config("tiny", ["vision.width=96", "vision.heads=4"])
    state = official_checkpoint(cfg)
    src = tmp_path / "official.pth"
    torch.save({"module": state}, src)  # DeepSpeed-saved layout
    report = _convert(capsys, src, tmp_path / "out", "--model", "tiny", "--keep-momentum", "vision.width=96",
                      "vision.heads=4")
    assert report["missing"] == [] and report["unexpected"] == []
    assert "visn_layer_norm.weight" in report["mapping"] and report["mapping"]["visn_layer_norm.weight"] == "visn_norm.weight"
    assert report["dropped"]["text_decoder_m.bert.encoder.layer.0.intermediate.dense.bias"].startswith("momentum copy of a part")
    from safetensors.torch import load_file
    teacher = load_file(str(tmp_path / "out" / "momentum.safetensors"))
    model = from_pretrained(tmp_path / "out")
    from mplug_ds.models.mplug import MPLUG
    assert set(teacher) == set(MPLUG(model.cfg, teacher=True).state_dict())
    assert torch.equal(teacher["visn_norm.weight"], model.visn_norm.weight)


def test_finetuned_vqa_layout_reports_missing_heads(tmp_path, capsys):
    """A fine-tuned VQA file (levels stripped, no contrastive/MLM heads): converts, the heads are reported missing."""
    cfg = load_model_config("tiny")
    state = official_checkpoint(cfg, pretrained=False, queues=False)
    torch.save(state, tmp_path / "vqa.pth")  # weights at the top level
    report = _convert(capsys, tmp_path / "vqa.pth", tmp_path / "out", "--model", "tiny")
    assert report["unexpected"] == []
    assert set(report["missing"]) >= {"itm_head.weight", "temp", "vision_proj.weight", "mlm_head.predictions.bias"}
    assert not any(k.startswith(("text_encoder.", "fusion.", "decoder.", "visual.")) for k in report["missing"])
    model = from_pretrained(tmp_path / "out")
    assert torch.equal(model.text_encoder.encoder.layer[1].output.dense.weight,
                       state["text_encoder.encoder.layer.1.output.dense.weight"])


def test_wrong_model_is_refused_naming_the_key(tmp_path, capsys):
    state = official_checkpoint(load_model_config("tiny"), momentum=False, queues=False)
    torch.save({"model": state}, tmp_path / "official.pth")
    rc = convert_checkpoint.main([str(tmp_path / "official.pth"), str(tmp_path / "out"), "--model", "tiny",
                                  "text.hidden_size=32", "text.heads=4"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "has shape" in err and "'" in err and "--model" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_json_report_is_all_of_stdout_when_run_as_a_command(tmp_path):
    """A fresh interpreter (where importing DeepSpeed would log its accelerator line to stdout): stdout parses as
    the JSON report; the warning about the heads left at random initialisation goes to stderr."""
    torch.save(official_checkpoint(load_model_config("tiny"), pretrained=False, queues=False), tmp_path / "vqa.pth")
    done = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), str(tmp_path / "vqa.pth"),
                           str(tmp_path / "out"), "--model", "tiny", "--json"], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout(300))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["unexpected"] == [] and "itm_head.weight" in report["missing"]
    assert "keep their random initialisation" in done.stderr and "itm_head" in done.stderr


# base and large at their real widths, text, fusion (with large's dead layers) and heads, with 2 of their ViT and
# decoder layers: a layer's keys map by its index alone, and the full depths cost 30 s of the suite.
SHALLOW = ("vision.layers=2", "decoder_layers=2")


@pytest.mark.slow
def test_base_official_layout(tmp_path, capsys):
    _check_model(tmp_path, capsys, "mplug.en.base", 64, SHALLOW)


@pytest.mark.slow
def test_large_official_layout(tmp_path, capsys):
    gc.collect()
    _check_model(tmp_path, capsys, "mplug.en.large", 56, SHALLOW)


def test_published_size_convention_matches_the_readme_arithmetic():
    """Architecture doc section 9: base 347.2M, large 565.7M executed-module parameters (README 350M / 600M)."""
    from mplug_ds.models.param_count import parameter_report
    base, large = (parameter_report(load_model_config(n)) for n in ("mplug.en.base", "mplug.en.large"))
    assert abs(base["published_convention_total"] / 1e6 - 347.2) < 0.05
    assert abs(large["published_convention_total"] / 1e6 - 565.7) < 0.05
    assert base["total"] != base["published_convention_total"]
