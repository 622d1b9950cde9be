"""Pre-training objectives: learning, masking rules, momentum teacher, and a full-size forward/backward."""
import pytest
import torch

from mplug_ds.data.collate import tokenize
from mplug_ds.data.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID
from mplug_ds.models.config import load_model_config
from mplug_ds.models.mplug import build_model
from mplug_ds.objectives.pretrain import PretrainConfig, PretrainModel, mask_tokens
from tests.model_utils import pretrain_batch

NO_DROPOUT = ["text.hidden_dropout=0", "text.attn_dropout=0"]


def test_tiny_model_overfits_a_fixed_batch_every_loss_halves_within_50_steps():
    torch.manual_seed(0)
    model = build_model(load_model_config("tiny", NO_DROPOUT))
    objective = PretrainModel(model, PretrainConfig(distill=False)).train()
    batch = pretrain_batch(batch_size=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(50):
        losses = objective(batch, alpha=0.0)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    for name in ("loss_ita", "loss_itm", "loss_mlm", "loss_prefix"):
        first, best = history[0][name], min(h[name] for h in history)
        assert best <= first / 2, f"{name} fell only from {first:.3f} to {best:.3f}"


def test_mlm_masking_never_picks_special_tokens_and_follows_80_10_10():
    torch.manual_seed(0)
    ids, _ = tokenize(["a dog runs across the green field near a small lake"] * 400, 16)
    masked, picked = mask_tokens(ids, 0.15, 30522)
    special = (ids == CLS_ID) | (ids == SEP_ID) | (ids == PAD_ID)
    assert not picked[special].any()
    assert torch.equal(masked[~picked], ids[~picked])
    rate = picked.sum() / (~special).sum()
    assert 0.13 < rate < 0.17
    to_mask = (masked[picked] == MASK_ID).float().mean()
    kept = (masked[picked] == ids[picked]).float().mean()
    assert 0.76 < to_mask < 0.84 and 0.07 < kept < 0.13
    assert (masked[picked & (masked != MASK_ID) & (masked != ids)] >= 999).all()


def test_mlm_masking_picks_at_least_one_word_per_row():
    ids, _ = tokenize(["a cat"] * 50, 6)
    _, picked = mask_tokens(ids, 0.01, 30522)
    assert picked.any(dim=1).all()


def test_momentum_teacher_is_fp32_outside_the_model_and_follows_the_ema():
    torch.manual_seed(0)
    model = build_model("tiny")
    objective = PretrainModel(model, PretrainConfig(momentum=0.9))
    teacher_ids = {id(p) for p in objective.teacher.model.parameters()}
    assert not teacher_ids & {id(p) for p in objective.parameters()}
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in objective.teacher.model.parameters())
    before = {n: p.clone() for n, p in objective.teacher.model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    objective.teacher.update()
    online = dict(model.named_parameters())
    for name, p_m in objective.teacher.model.named_parameters():
        assert torch.allclose(p_m, 0.9 * before[name] + 0.1 * online[name].float(), atol=1e-6), name
    assert {n for n, _ in objective.teacher.model.named_parameters()} >= {
        n for n in online if n.startswith(("fusion.", "mlm_head.", "text_encoder.", "visual."))}


def test_distillation_at_alpha_zero_equals_distillation_off_and_alpha_changes_ita_and_mlm():
    torch.manual_seed(0)
    model = build_model(load_model_config("tiny", NO_DROPOUT)).eval()
    distilled = PretrainModel(model, PretrainConfig(distill=True))
    plain = PretrainModel(model, PretrainConfig(distill=False))
    batch = pretrain_batch()

    def losses(objective, alpha):
        torch.manual_seed(1)  # the same MLM masks and ITM negatives for every call
        return objective(batch, alpha=alpha)

    off, zero, on = losses(plain, 0.4), losses(distilled, 0.0), losses(distilled, 0.4)
    for key in ("loss_ita", "loss_mlm", "loss_itm", "loss_prefix", "loss"):
        assert torch.equal(zero[key], off[key]), key  # alpha = 0 is exactly no distillation
    for key in ("loss_ita", "loss_mlm"):  # the two losses distillation touches
        assert not torch.isclose(on[key], off[key]), key
    assert torch.equal(on["loss_prefix"], off["loss_prefix"])


@pytest.mark.slow
def test_base_model_forward_backward_at_batch_2_on_cpu():
    """The full-size architecture end to end (every loss, the gradients, base's fusion layout), at 128 px: the
    same layers on a quarter of the 256-px tokens."""
    torch.manual_seed(0)
    model = build_model(load_model_config("mplug.en.base", ["vision.image_size=128"]))
    objective = PretrainModel(model, PretrainConfig())
    losses = objective(pretrain_batch(batch_size=2, image_size=128), alpha=0.4)
    losses["loss"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.visual.vit.blocks[0].attn.qkv.weight.grad is not None
    assert model.fusion.encoder.layer[3].connected and model.fusion.encoder.layer[3].crossattention is None
