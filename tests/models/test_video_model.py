"""Clips through the image model: per-frame ViT, mean of projected frame features, concatenated (or reduced) frame
tokens, and a temporal embedding that changes nothing until it is trained."""
import pytest
import torch

from mplug_ds.models.config import load_model_config
from mplug_ds.models.mplug import build_model


def _model(*overrides):
    torch.manual_seed(0)
    return build_model(load_model_config("tiny", list(overrides))).eval()


def test_a_clip_is_its_frames_through_the_image_encoder():
    model = _model()
    clips = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        memory, feature = model.encode_visual(clips)
        frames = model.encode_image(clips.flatten(0, 1)).unflatten(0, (2, 3))  # (B, T, 17, H)
        per_frame = model.vision_proj(frames[:, :, 0])
    assert memory.shape == (2, 3 * 17, 64)
    assert torch.allclose(memory, frames.flatten(1, 2), atol=1e-6)
    assert torch.allclose(feature, torch.nn.functional.normalize(per_frame.mean(dim=1), dim=-1), atol=1e-6)
    with torch.no_grad():  # one frame is an image
        single, single_feature = model.encode_visual(clips[:, :1])
        image, image_feature = model.encode_visual(clips[:, 0])
    assert torch.allclose(single, image, atol=1e-6) and torch.allclose(single_feature, image_feature, atol=1e-6)


def test_the_temporal_embedding_at_init_leaves_every_output_unchanged():
    plain, timed = _model(), _model("video.temporal_embedding=true", "video.max_frames=4")
    missing = timed.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["temporal_pos_embed"]  # an image checkpoint lacks it: it stays at its zero initialisation
    clips = torch.randn(2, 4, 3, 64, 64)
    ids = torch.tensor([[101, 2023, 2003, 102]] * 2)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        outs = [(m.encode_visual(clips), m.fuse(m.encode_visual(clips).memory, m.encode_text(ids, mask), mask))
                for m in (plain, timed)]
        for (a, fa), (b, fb) in [outs]:
            assert torch.equal(a.memory, b.memory) and torch.equal(a.feature, b.feature)
            assert all(torch.equal(x, y) for x, y in zip(fa, fb))
        timed.temporal_pos_embed.normal_()  # once trained, frames differ by their position in the clip
        assert not torch.allclose(timed.encode_visual(clips).memory, outs[0][0].memory)
    with pytest.raises(ValueError, match="max_frames"):
        timed.encode_visual(torch.randn(1, 5, 3, 64, 64))


@pytest.mark.parametrize("memory, tokens", [("mean", 17), ("pool", 3 * (1 + 16 // 4))])
def test_reduced_memories_for_long_clips(memory, tokens):
    model = _model(f"video.memory={memory}", "video.pool_size=2")
    clips = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        reduced = model.encode_visual(clips).memory
        frames = model.encode_image(clips.flatten(0, 1)).unflatten(0, (2, 3))
    assert reduced.shape == (2, tokens, 64)
    if memory == "mean":
        assert torch.allclose(reduced, frames.mean(dim=1), atol=1e-6)
    else:  # per frame: class token, then the 4x4 patch grid pooled 2x2 into 4 tokens (row-major)
        assert torch.allclose(reduced[:, 0], frames[:, 0, 0], atol=1e-6)
        assert torch.allclose(reduced[:, 1], frames[:, 0, [1, 2, 5, 6]].mean(dim=1), atol=1e-6)
        assert torch.allclose(reduced[:, 5], frames[:, 1, 0], atol=1e-6)
