"""--pretrained: export directories load with a resized positional embedding and a report; bad paths fail early."""
import pytest
import torch
from safetensors.torch import save_file

from mplug_ds.config import ConfigError
from mplug_ds.models.config import load_model_config
from mplug_ds.models.mplug import build_model
from mplug_ds.tasks.pretrained import POS_EMBED, check_pretrained, load_pretrained


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("tiny")
    out = tmp_path_factory.mktemp("export")
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    state["queue_from_another_head"] = torch.zeros(3)
    save_file(state, str(out / "model.safetensors"))
    return out, model


def test_export_loads_into_a_higher_resolution_model_with_a_report(export_dir):
    path, source = export_dir
    cfg = load_model_config("tiny", ["vision.image_size=128"])
    check_pretrained(path, cfg)
    model = build_model(cfg)
    report = load_pretrained(model, path)
    assert report.missing == [] and report.unexpected == ["queue_from_another_head"]
    assert report.resized == [f"{POS_EMBED} [1, 17, 64] → [1, 65, 64]"]
    assert model.visual.vit.pos_embed.shape == (1, 65, 64)
    assert torch.equal(model.visual.vit.pos_embed[0, 0], source.visual.vit.pos_embed[0, 0])  # class row kept
    assert torch.equal(model.text_encoder.encoder.layer[0].attention.self.query.weight,
                       source.text_encoder.encoder.layer[0].attention.self.query.weight)
    assert "resized" in report.format() and "unexpected" in report.format()


def test_missing_and_incompatible_checkpoints_fail_naming_the_fix(export_dir, tmp_path):
    path, _ = export_dir
    with pytest.raises(ConfigError, match="no such file"):
        check_pretrained(tmp_path / "nope", load_model_config("tiny"))
    with pytest.raises(ConfigError, match="not an export directory .* nor a DeepSpeed checkpoint"):
        check_pretrained(tmp_path, load_model_config("tiny"))
    with pytest.raises(ConfigError, match=r"'text_proj.bias' has shape \[32\] but model 'tiny' expects "
                                          r"\[48\]; set model.name"):
        check_pretrained(path, load_model_config("tiny", ["embed_dim=48"]))
    with pytest.raises(ConfigError, match="only .* tensors of model 'mplug.en.base'"):
        check_pretrained(path, load_model_config("mplug.en.base"))
