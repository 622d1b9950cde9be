"""Numerical parity of our encoders and attention backends against independent implementations (fp32)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import BertModel

from mplug_ds.models.attention import BACKENDS, attention, flash_attn_func
from mplug_ds.models.config import VisionConfig
from mplug_ds.models.text import TextEncoder
from mplug_ds.models.vision import VisionEncoder, resize_pos_embed
from mplug_ds.models.weights import load_bert_stack, load_clip_visual, text_config_from_hf


def test_text_encoder_matches_transformers_bert_with_real_weights(minilm_dir):
    torch.manual_seed(0)
    reference = BertModel.from_pretrained(minilm_dir, add_pooling_layer=False, attn_implementation="eager").eval()
    ours = TextEncoder(text_config_from_hf(minilm_dir), num_layers=6).eval()
    assert load_bert_stack(ours, minilm_dir) == []
    ids = torch.randint(999, 30522, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[2, 5:] = 0
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    keep = mask.bool()
    assert (got[keep] - expected[keep]).abs().max() < 1e-4


def test_vision_encoder_matches_open_clip():
    from open_clip.transformer import QuickGELU
    from open_clip.transformer import VisionTransformer as OpenClipViT

    torch.manual_seed(0)
    reference = OpenClipViT(image_size=224, patch_size=32, width=96, layers=3, heads=4, mlp_ratio=4.0,
                            output_dim=48, act_layer=QuickGELU, output_tokens=True).eval()
    for p in reference.parameters():  # open_clip zero-inits some tensors; make every weight matter
        torch.nn.init.normal_(p, std=0.05)
    state = {f"visual.{k}": v for k, v in reference.state_dict().items()}
    ours = VisionEncoder(VisionConfig(image_size=224, patch_size=32, width=96, layers=3, heads=4)).eval()
    load_clip_visual(ours, state)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        pooled, tokens = reference(images)
        got = ours(images)
    assert got.shape == (2, 1 + 49, 96)
    assert (got[:, 1:] - tokens).abs().max() < 1e-4
    assert (got[:, 0] @ reference.proj - pooled).abs().max() < 1e-4


def test_vision_tap_and_activation_checkpointing_leave_the_numbers_unchanged():
    """The tap after block k is block k's output (class token first); checkpointing changes neither outputs nor
    gradients."""
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=64, patch_size=16, width=64, layers=3, heads=4)
    plain, recomputing = VisionEncoder(cfg), VisionEncoder(cfg, grad_checkpointing=True)
    recomputing.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 64, 64)
    out = plain(images)
    tapped_out, tapped = plain(images, tap_layer=1)
    vit = plain.vit
    assert torch.equal(out, tapped_out) and tapped.shape == (2, 1 + 16, 64)
    assert torch.allclose(vit.norm(vit.blocks[2](tapped)), out, atol=1e-5)  # the rest of the stack continues it
    out.square().mean().backward()
    recomputing(images).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), recomputing.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_positional_embedding_resize_keeps_class_row_and_interpolates_bilinearly():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 16, 8)
    resized = resize_pos_embed(pos, grid=6)
    assert resized.shape == (1, 1 + 36, 8)
    assert torch.equal(resized[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False)
    assert (resized[:, 1:] - expected.permute(0, 2, 3, 1).reshape(1, 36, 8)).abs().max() < 1e-6


def test_clip_checkpoint_loads_at_a_new_resolution():
    from open_clip.transformer import VisionTransformer as OpenClipViT

    reference = OpenClipViT(image_size=64, patch_size=16, width=32, layers=1, heads=2, mlp_ratio=4.0, output_dim=8)
    ours = VisionEncoder(VisionConfig(image_size=96, patch_size=16, width=32, layers=1, heads=2))
    load_clip_visual(ours, {f"visual.{k}": v for k, v in reference.state_dict().items()})
    expected = resize_pos_embed(reference.positional_embedding[None].detach(), grid=6)
    assert torch.equal(ours.vit.pos_embed.detach(), expected)
    assert ours(torch.randn(1, 3, 96, 96)).shape == (1, 37, 32)


def _random_qkv(lq, lk):
    torch.manual_seed(0)
    return torch.randn(3, 4, lq, 16), torch.randn(3, 4, lk, 16), torch.randn(3, 4, lk, 16)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_backends_agree(causal):
    q, k, v = _random_qkv(9, 9 if causal else 13)
    key_mask = torch.ones(3, k.shape[2], dtype=torch.long)
    key_mask[1, 6:] = 0
    available = [b for b in BACKENDS if b != "flash_attn" or (flash_attn_func and torch.cuda.is_available())]
    outs = {b: attention(q, k, v, key_mask=key_mask, causal=causal, backend=b) for b in available}
    ref = outs["eager"]
    for name, out in outs.items():
        assert (out - ref).abs().max() < 1e-5, name


def test_attention_masked_keys_are_ignored():
    q, k, v = _random_qkv(4, 6)
    key_mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 3)
    full = attention(q, k, v, key_mask=key_mask)
    trimmed = attention(q, k[:, :, :3], v[:, :, :3])
    assert (full - trimmed).abs().max() < 1e-5


def test_causal_attention_aligns_new_queries_with_the_end_of_the_cache():
    q, k, v = _random_qkv(6, 6)
    full = attention(q, k, v, causal=True)
    last_two = attention(q[:, :, 4:], k, v, causal=True)
    assert (full[:, :, 4:] - last_two).abs().max() < 1e-5
