"""Checkpoints in the released mPLUG layout (architecture doc §10), built from the documented names and shapes,
and the by-hand mapping of such a checkpoint onto our modules that the converter is checked against.

Every weight is a view into one random buffer at a key-dependent offset (LayerNorm scales are their own tensors),
so a full-size checkpoint with momentum copies, queues and the CLIP text tower costs little memory and disk.
"""
from __future__ import annotations

import zlib

import torch

from mplug_ds.models.config import ModelConfig
from mplug_ds.models.mplug import MPLUG
from mplug_ds.models.weights import load_clip_visual

QUEUE = 65536


class _Values:
    def __init__(self, size: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.buffer = torch.randn(size, generator=gen) * 0.02
        self.gen = gen

    def __call__(self, key: str, *shape: int) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        if key.endswith(("LayerNorm.weight", "norm.weight")) or ".ln_" in key and key.endswith("weight"):
            return 1 + 0.1 * torch.randn(*shape, generator=self.gen)
        start = zlib.crc32(key.encode()) % (self.buffer.numel() - numel)
        return self.buffer[start:start + numel].view(*shape)


def _bert_layer(v, prefix, h, inter, cross):
    out = {}
    for part in ("attention",) + (("crossattention",) if cross else ()):
        for name in ("query", "key", "value"):
            out[f"{prefix}.{part}.self.{name}.weight"] = v(f"{prefix}.{part}.self.{name}.weight", h, h)
            out[f"{prefix}.{part}.self.{name}.bias"] = v(f"{prefix}.{part}.self.{name}.bias", h)
        out[f"{prefix}.{part}.output.dense.weight"] = v(f"{prefix}.{part}.output.dense.weight", h, h)
        out[f"{prefix}.{part}.output.dense.bias"] = v(f"{prefix}.{part}.output.dense.bias", h)
        for n in ("weight", "bias"):
            out[f"{prefix}.{part}.output.LayerNorm.{n}"] = v(f"{prefix}.{part}.output.LayerNorm.{n}", h)
    out[f"{prefix}.intermediate.dense.weight"] = v(f"{prefix}.intermediate.dense.weight", inter, h)
    out[f"{prefix}.intermediate.dense.bias"] = v(f"{prefix}.intermediate.dense.bias", inter)
    out[f"{prefix}.output.dense.weight"] = v(f"{prefix}.output.dense.weight", h, inter)
    out[f"{prefix}.output.dense.bias"] = v(f"{prefix}.output.dense.bias", h)
    for n in ("weight", "bias"):
        out[f"{prefix}.output.LayerNorm.{n}"] = v(f"{prefix}.output.LayerNorm.{n}", h)
    return out


def _bert(v, prefix, cfg, layers, cross):
    t = cfg.text
    out = {f"{prefix}.embeddings.word_embeddings.weight": v(f"{prefix}.word", t.vocab_size, t.hidden_size),
           f"{prefix}.embeddings.position_embeddings.weight": v(f"{prefix}.pos", t.max_position_embeddings, t.hidden_size),
           f"{prefix}.embeddings.token_type_embeddings.weight": v(f"{prefix}.type", 2, t.hidden_size),
           f"{prefix}.embeddings.LayerNorm.weight": v(f"{prefix}.embeddings.LayerNorm.weight", t.hidden_size),
           f"{prefix}.embeddings.LayerNorm.bias": v(f"{prefix}.embeddings.LayerNorm.bias", t.hidden_size),
           f"{prefix}.embeddings.position_ids": torch.arange(t.max_position_embeddings)[None]}
    for i in range(layers):
        out.update(_bert_layer(v, f"{prefix}.encoder.layer.{i}", t.hidden_size, t.intermediate_size, cross))
    return out


def _lm_head(v, prefix, cfg, tied_to=None):
    h, vocab = cfg.text.hidden_size, cfg.text.vocab_size
    bias = v(f"{prefix}.bias", vocab)
    return {f"{prefix}.predictions.bias": bias,
            f"{prefix}.predictions.decoder.bias": bias,  # BERT ties it to predictions.bias: every release has it
            f"{prefix}.predictions.transform.dense.weight": v(f"{prefix}.dense", h, h),
            f"{prefix}.predictions.transform.dense.bias": v(f"{prefix}.dense.b", h),
            f"{prefix}.predictions.transform.LayerNorm.weight": v(f"{prefix}.LayerNorm.weight", h),
            f"{prefix}.predictions.transform.LayerNorm.bias": v(f"{prefix}.LayerNorm.bias", h),
            f"{prefix}.predictions.decoder.weight": tied_to if tied_to is not None else v(f"{prefix}.dec", vocab, h)}


def _clip(v, w, layers, patch, rows, embed, text_width, prefix="visual_encoder"):
    out = {}

    def block(p, width):
        out.update({f"{p}.attn.in_proj_weight": v(f"{p}.inw", 3 * width, width), f"{p}.attn.in_proj_bias": v(f"{p}.inb", 3 * width),
                    f"{p}.attn.out_proj.weight": v(f"{p}.ow", width, width), f"{p}.attn.out_proj.bias": v(f"{p}.ob", width),
                    f"{p}.ln_1.weight": v(f"{p}.ln_1.weight", width), f"{p}.ln_1.bias": v(f"{p}.ln_1.b", width),
                    f"{p}.ln_2.weight": v(f"{p}.ln_2.weight", width), f"{p}.ln_2.bias": v(f"{p}.ln_2.b", width),
                    f"{p}.mlp.c_fc.weight": v(f"{p}.fcw", 4 * width, width), f"{p}.mlp.c_fc.bias": v(f"{p}.fcb", 4 * width),
                    f"{p}.mlp.c_proj.weight": v(f"{p}.pw", width, 4 * width), f"{p}.mlp.c_proj.bias": v(f"{p}.pb", width)})

    vis = f"{prefix}.visual"
    out.update({f"{vis}.conv1.weight": v("conv1", w, 3, patch, patch), f"{vis}.class_embedding": v("cls", w),
                f"{vis}.positional_embedding": v("pos", rows, w), f"{vis}.ln_pre.weight": v("vis.ln_pre.weight", w),
                f"{vis}.ln_pre.bias": v("ln_pre.b", w), f"{vis}.ln_post.weight": v("vis.ln_post.weight", w),
                f"{vis}.ln_post.bias": v("ln_post.b", w), f"{vis}.proj": v("proj", w, embed)})
    for i in range(layers):
        block(f"{vis}.transformer.resblocks.{i}", w)
    out.update({f"{prefix}.positional_embedding": v("tpos", 77, text_width),
                f"{prefix}.text_projection": v("tproj", text_width, embed), f"{prefix}.logit_scale": torch.tensor(4.6),
                f"{prefix}.token_embedding.weight": v("tok", 49408, text_width),
                f"{prefix}.ln_final.weight": v("ln_final.weight", text_width), f"{prefix}.ln_final.bias": v("lnf.b", text_width)})
    for i in range(12):
        block(f"{prefix}.transformer.resblocks.{i}", text_width)
    return out


def official_checkpoint(cfg: ModelConfig, pretrained: bool = True, momentum: bool = True, queues: bool = True,
                        stored_grid: int = 16, clip_text_width: int = 512, clip_embed: int = 512,
                        fusion_total: int = 12) -> dict[str, torch.Tensor]:
    """The state dict a released mPLUG file holds for a model shaped like ``cfg``.

    ``pretrained``: keys with the pre-training levels (``text_encoder.bert.``, ``fusion_encoder.fusion.``, the
    MLM head ``fusion_encoder.cls``); otherwise the fine-tuned VQA layout (levels stripped, no MLM/ITM heads).
    """
    v = _Values(40_000_000)
    t, vis = cfg.text, cfg.vision
    h = t.hidden_size
    enc, fus = ("text_encoder.bert", "fusion_encoder.fusion") if pretrained else ("text_encoder", "fusion_encoder")
    online = _clip(v, vis.width, vis.layers, vis.patch_size, stored_grid ** 2 + 1, clip_embed, clip_text_width)
    if vis.width != h:
        online.update({"visn_fc.weight": v("visn_fc.w", h, vis.width), "visn_fc.bias": v("visn_fc.b", h),
                       "visn_layer_norm.weight": v("visn.LayerNorm.weight", h), "visn_layer_norm.bias": v("visnb", h)})
    online.update(_bert(v, enc, cfg, cfg.text_encoder_layers, cross=False))
    online.update(_bert(v, fus, cfg, fusion_total, cross=True))
    decoder = _bert(v, "text_decoder.bert", cfg, cfg.decoder_layers, cross=True)
    online.update(decoder)
    online.update(_lm_head(v, "text_decoder.cls", cfg, decoder["text_decoder.bert.embeddings.word_embeddings.weight"]))
    if pretrained:
        online.update(_lm_head(v, "fusion_encoder.cls", cfg, online[f"{fus}.embeddings.word_embeddings.weight"]))
        online.update({"vision_proj.weight": v("vp", cfg.embed_dim, h), "vision_proj.bias": v("vpb", cfg.embed_dim),
                       "text_proj.weight": v("tp", cfg.embed_dim, h), "text_proj.bias": v("tpb", cfg.embed_dim),
                       "itm_head.weight": v("itm", 2, h), "itm_head.bias": v("itmb", 2), "temp": torch.tensor(0.07)})
    state = dict(online)
    if momentum:  # the official copies: identical shapes (and, at initialisation, values)
        for key, value in online.items():
            head, _, rest = key.partition(".")
            if head in ("visual_encoder", "visn_fc", "visn_layer_norm", "text_encoder", "fusion_encoder",
                        "text_decoder", "vision_proj", "text_proj"):
                state[f"{head}_m.{rest}"] = value
    if queues:
        state.update({"image_queue": v("iq", cfg.embed_dim, QUEUE), "text_queue": v("tq", cfg.embed_dim, QUEUE),
                      "idx_queue": torch.full((1, QUEUE), -100), "queue_ptr": torch.zeros(1, dtype=torch.long)})
    return state


@torch.no_grad()
def map_by_hand(state: dict[str, torch.Tensor], cfg: ModelConfig, fusion_total: int = 12) -> MPLUG:
    """Our model with ``state``'s weights placed module by module (the reference the converter must match)."""
    model = MPLUG(cfg).eval()
    load_clip_visual(model.visual, {k.removeprefix("visual_encoder."): v for k, v in state.items()
                                    if k.startswith("visual_encoder.visual.")})

    def sub(prefix, drop=()):
        return {k[len(prefix):]: v for k, v in state.items()
                if k.startswith(prefix) and not k.endswith("position_ids") and not any(d in k for d in drop)}

    if model.visn_fc is not None:
        model.visn_fc.load_state_dict(sub("visn_fc."))
        model.visn_norm.load_state_dict(sub("visn_layer_norm."))
    model.text_encoder.load_state_dict(sub("text_encoder.bert."))
    start = fusion_total - cfg.fusion_layers
    for j, layer in enumerate(model.fusion.encoder.layer):
        drop = ("crossattention",) if layer.crossattention is None else ()
        layer.load_state_dict(sub(f"fusion_encoder.fusion.encoder.layer.{start + j}.", drop))
    alias = ("predictions.decoder.bias",)  # BERT's tied alias of predictions.bias: our heads have only that one
    model.mlm_head.load_state_dict(sub("fusion_encoder.cls.", alias))
    model.decoder.load_state_dict(sub("text_decoder.", alias))
    for name in ("vision_proj", "text_proj", "itm_head"):
        getattr(model, name).load_state_dict(sub(f"{name}."))
    model.temp.fill_(state["temp"].item())
    return model


@torch.no_grad()
def forward_outputs(model: MPLUG, image_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every head's output for one image and one caption (eval mode, fp32)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(1, 3, image_size, image_size, generator=gen)
    ids = torch.randint(1000, 2000, (1, 9), generator=gen)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    model.eval()
    image = model.encode_image(images)
    text = model.encode_text(ids, mask)
    image_out, text_out = model.fuse(image, text, mask)
    memory, memory_mask = model.memory(image_out, text_out, mask)
    return {"image": image, "text": text, "image_out": image_out, "text_out": text_out,
            "mlm": model.mlm_head(text_out), "itm": model.itm_head(text_out[:, 0]),
            "image_feature": model.image_feature(image), "text_feature": model.text_feature(text),
            "decoder": model.decoder(ids, mask, memory, memory_mask), "temp": model.temperature()}
