"""The TiMix objective on the tiny model: the predictor side branch, patch-text alignment, the fused loss."""
import torch

from mplug_ds.data.collate import collate_region
from mplug_ds.data.region_streams import REGION_FIELDS
from mplug_ds.data.transforms import box_to_patch_labels
from mplug_ds.models.config import load_model_config
from mplug_ds.models.mplug import build_model
from mplug_ds.objectives.pretrain import PretrainConfig
from mplug_ds.objectives.timix import TimixConfig, TimixPretrainModel, alignment_loss
from tests.model_utils import pretrain_batch

NO_DROPOUT = ["text.hidden_dropout=0", "text.attn_dropout=0"]


def region_batch(images=3, phrases_per_image=(2, 1, 3), seed=0):
    """Region fields collated by the loader's own ``collate_region`` and named as in a joined TiMix batch."""
    gen = torch.Generator().manual_seed(seed)
    boxes = [[0, 0, 20, 20], [30, 30, 64, 64], [10, 40, 30, 64], [0, 0, 64, 64], [40, 0, 64, 30], [5, 5, 40, 12]]
    items, phrase = [], 0
    for i, n in enumerate(phrases_per_image):
        texts = [f"a red circle number {phrase + j}" for j in range(n)]
        labels = [box_to_patch_labels(boxes[(phrase + j) % len(boxes)], 64, 16) for j in range(n)]
        items.append({"key": str(i), "image": torch.randn(3, 64, 64, generator=gen), "texts": texts,
                      "patch_labels": labels})
        phrase += n
    batch = collate_region(items, 10)
    return {name: batch[key] for key, name in REGION_FIELDS.items()}


def timix_objective(layer=1, **timix):
    torch.manual_seed(0)
    model = build_model(load_model_config("tiny", NO_DROPOUT + [f"patch_predictor_layer={layer}"])).eval()
    return TimixPretrainModel(model, PretrainConfig(), TimixConfig(enabled=True, **timix))


def test_predictor_is_a_side_branch_and_absent_when_off():
    torch.manual_seed(0)
    plain = build_model(load_model_config("tiny", NO_DROPOUT)).eval()
    torch.manual_seed(0)
    tapped_model = build_model(load_model_config("tiny", NO_DROPOUT + ["patch_predictor_layer=1"])).eval()
    assert plain.patch_predictor is None and not any("patch_predictor" in n for n, _ in plain.named_parameters())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        image, tapped = tapped_model.encode_image_tapped(images)
        assert torch.equal(image, plain.encode_image(images))
        assert torch.equal(tapped, tapped_model.encode_image_prefix(images))
        log_probs = tapped_model.patch_log_probs(tapped, torch.randn(2, 5, 64))
    assert log_probs.shape == (2, 16, 2)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(2, 16))


def test_alignment_runs_each_region_image_once_and_only_up_to_the_predictor_block():
    objective = timix_objective(layer=1)
    batch = region_batch()
    seen = []
    hook = objective.model.visual.vit.patch_embed.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    ran = []
    later = objective.model.visual.vit.blocks[2].register_forward_hook(lambda m, i, o: ran.append(1))
    loss, metrics = objective.alignment(batch)
    hook.remove(), later.remove()
    assert seen == [3] and not ran  # 3 distinct images for 6 phrases; blocks after block 1 never run
    loss.backward()
    vit = objective.model.visual.vit
    assert vit.blocks[1].mlp.fc2.weight.grad.abs().sum() > 0 and vit.blocks[2].mlp.fc2.weight.grad is None
    assert objective.model.text_encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert set(metrics) == {"pta_accuracy", "pta_precision", "pta_recall", "pta_positive_rate"}


def test_alignment_metrics_count_the_relevant_class():
    labels = torch.tensor([[1, 1, 0, 0]])
    log_probs = torch.log(torch.tensor([[[0.2, 0.8], [0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]]))
    loss, m = alignment_loss(log_probs, labels)
    assert torch.allclose(loss, -torch.log(torch.tensor([0.8, 0.1, 0.3, 0.6])).mean())
    assert m["pta_accuracy"] == 0.5 and m["pta_precision"] == 0.5 and m["pta_recall"] == 0.5
    assert m["pta_positive_rate"] == 0.5


def test_fused_forward_adds_alignment_and_mixed_losses_and_one_backward_reaches_everything():
    for mix_space in ("tokens", "pixels"):
        objective = timix_objective(mix_space=mix_space, label_mode="relevance_pred", side_per_sample=True,
                                    pairing="derangement")
        batch = {**pretrain_batch(batch_size=5), **region_batch()}
        torch.manual_seed(1)
        out = objective(batch, alpha=0.4, gamma=0.5)
        for key in ("loss_pta", "loss_mix", "pta_recall", "mix_lambda_mean", "mix_side_mean"):
            assert torch.isfinite(out[key]), key
        main = sum(out[k] for k in ("loss_ita", "loss_itm", "loss_mlm", "loss_prefix"))
        assert torch.allclose(out["loss"], main + out["loss_pta"] + 0.5 * out["loss_mix"], atol=1e-5)
        out["loss"].backward()
        grads = {n: p.grad for n, p in objective.model.named_parameters()}
        assert all(g is not None for n, g in grads.items() if n.startswith(("patch_predictor", "visual")))


def test_gamma_zero_skips_the_mixed_pass():
    objective = timix_objective()
    calls = []
    objective.model.visual.vit.patch_embed.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    out = objective({**pretrain_batch(batch_size=4), **region_batch()}, alpha=0.0, gamma=0.0)
    assert out["loss_mix"] == 0 and calls == [4, 3]  # main images, region images; no mixed images


def test_reference_three_phases_give_the_fused_losses_before_any_update():
    objective = timix_objective(side_per_sample=True, label_mode="relevance_pred", pta_weight=0.5)
    batch = {**pretrain_batch(batch_size=4), **region_batch()}
    torch.manual_seed(3)
    fused = objective(batch, alpha=0.4, gamma=0.7)
    torch.manual_seed(3)
    phases = [objective(batch, alpha=0.4, gamma=0.7, phase=p) for p in ("pta", "main", "mix")]
    for key, value in fused.items():
        assert torch.allclose(sum(p[key] for p in phases), value, atol=1e-5), key
    assert phases[0]["loss_ita"] == 0 and phases[2]["loss_pta"] == 0  # each phase computes only its own part
