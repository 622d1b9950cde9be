"""Released mPLUG checkpoints (X-PLUG/mPLUG, TiMix) → mplug_ds state dicts, with a report of every key.

Handles the pre-trained files (``text_encoder.bert.*``, ``fusion_encoder.fusion.*`` / ``fusion_encoder.bert.*``,
``fusion_encoder.cls.*``) and the fine-tuned VQA / caption / retrieval / grounding files (those levels already
stripped), with the weights at the top level or under ``model`` / ``module``. Steps (architecture doc §10):

* ViT: ``visual_encoder.visual.*`` (OpenAI-CLIP names) → ``visual.vit.*`` (timm names); fused ``in_proj`` kept
  fused (timm's ``qkv`` stacks q|k|v the same way); positional embedding resized to the target grid (bilinear,
  class row kept); class embedding reshaped; the CLIP text tower and ``proj`` dropped.
* Text: the ``.bert.`` / ``.fusion.`` levels removed; fusion layer i → i − (N − F) for the F executed layers of N,
  the dead layers, the fusion embeddings and the connected layers' cross-attention dropped; ``text_decoder`` →
  ``decoder``; ``fusion_encoder.cls`` → ``mlm_head``; ``visn_layer_norm`` → ``visn_norm``; the LM head's tied
  ``decoder.weight`` alias taken from the word embeddings it is tied to; its ``decoder.bias`` (every release
  stores it: BERT ties it to ``predictions.bias``) dropped as that alias after checking it is the same tensor;
  ``temp`` () → (1,).
* Queues, grounding buffers and ``position_ids`` dropped; momentum copies (``*_m.*``) dropped, or mapped onto the
  momentum teacher with ``keep_momentum``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from mplug_ds.models.config import ModelConfig
from mplug_ds.models.fusion import connected_layers
from mplug_ds.models.mplug import MPLUG
from mplug_ds.models.vision import resize_pos_embed

_CLIP_BLOCK = {
    "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
    "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias", "ln_2.weight": "norm2.weight", "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_CLIP_TOP = {
    "conv1.weight": "patch_embed.proj.weight", "class_embedding": "cls_token", "positional_embedding": "pos_embed",
    "ln_pre.weight": "norm_pre.weight", "ln_pre.bias": "norm_pre.bias",
    "ln_post.weight": "norm.weight", "ln_post.bias": "norm.bias",
}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_FUSION_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_COMPONENTS = ("visual_encoder", "visn_fc", "visn_layer_norm", "text_encoder", "fusion_encoder", "text_decoder",
               "vision_proj", "text_proj", "itm_head")
_DROPPED_BUFFERS = {
    "image_queue": "contrastive queue of the official ITA loss (state, not a weight; ours uses in-batch negatives)",
    "text_queue": "contrastive queue of the official ITA loss (state, not a weight; ours uses in-batch negatives)",
    "idx_queue": "image-id queue of the official retrieval loss (state, not a weight)",
    "queue_ptr": "queue pointer of the official ITA loss (state, not a weight)",
    "prefix_ids": "grounding buffer (rebuilt from the tokenizer)",
    "target_ids": "grounding buffer (rebuilt from the tokenizer)",
    "bbox_prob_mask": "grounding buffer (rebuilt from the tokenizer)",
}


class _Drop(Exception):
    """Raised by the name mapping: the key is deliberately not converted (the message is the reason)."""


@dataclass
class ConversionReport:
    """What happened to every key: ``mapped`` source → target, ``dropped`` source → reason, ``missing`` (our keys
    the checkpoint did not provide; left at initialisation), ``unexpected`` (source keys nothing explains)."""

    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"mapped": len(self.mapped), "dropped": self.dropped, "missing": self.missing,
                "unexpected": self.unexpected, "mapping": self.mapped}

    def lines(self) -> list[str]:
        """A human-readable report, one key per line."""
        out = [f"mapped {len(self.mapped)}, dropped {len(self.dropped)}, missing {len(self.missing)}, "
               f"unexpected {len(self.unexpected)}"]
        out += [f"  mapped     {src} -> {dst}" for src, dst in self.mapped.items()]
        out += [f"  dropped    {src}: {why}" for src, why in self.dropped.items()]
        out += [f"  missing    {key} (not in the checkpoint; left at initialisation)" for key in self.missing]
        out += [f"  unexpected {key} (no known meaning; not converted)" for key in self.unexpected]
        return out


def official_state_dict(checkpoint: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The weights of a released file: under ``model`` or ``module`` (DeepSpeed) or at the top level."""
    if isinstance(checkpoint, dict):
        for key in ("model", "module", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{source}: no state dict found (looked under 'model', 'module' and at the top level)")
    state = {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not any(k.startswith("visual_encoder.") for k in state):
        raise ValueError(f"{source}: no 'visual_encoder.*' keys; this is not an official mPLUG checkpoint "
                         f"(first keys: {list(state)[:3]})")
    return state


def canonical_name(key: str) -> str:
    """Remove the pre-training file's ``.bert.`` / ``.fusion.`` levels (kept under ``text_decoder``)."""
    head, _, rest = key.partition(".")
    if head.removesuffix("_m") in ("text_encoder", "fusion_encoder"):
        for level in ("bert.", "fusion."):
            rest = rest.removeprefix(level)
    return f"{head}.{rest}" if rest else head


class _Mapper:
    """Maps one canonical official key (without the ``_m`` suffix) to our name and value."""

    def __init__(self, cfg: ModelConfig, fusion_layers_in_file: int) -> None:
        self.cfg = cfg
        self.fusion_start = fusion_layers_in_file - cfg.fusion_layers
        if self.fusion_start < 0:
            raise ValueError(f"the checkpoint has {fusion_layers_in_file} fusion layers, model '{cfg.name}' needs "
                             f"{cfg.fusion_layers}; pick the --model the checkpoint was trained as")
        self.connected = connected_layers(cfg.fusion_layers, cfg.fusion_stride, cfg.fusion_schedule)

    def __call__(self, key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
        component, _, rest = key.partition(".")
        if component == "visual_encoder":
            return self.visual(rest, value)
        if component in ("visn_fc", "vision_proj", "text_proj", "itm_head"):
            return key, value
        if component == "visn_layer_norm":
            return f"visn_norm.{rest}", value
        if component == "temp":
            return "temp", value.reshape(1)
        if rest.endswith("position_ids"):
            raise _Drop("position-id buffer (recomputed)")
        if ".pooler." in f".{rest}":
            raise _Drop("BERT pooler (never run by mPLUG)")
        if component == "text_encoder":
            return f"text_encoder.{rest}", value
        if component == "fusion_encoder":
            return self.fusion(rest, value)
        if component == "text_decoder":
            return f"decoder.{rest}", value
        raise KeyError(key)

    def visual(self, rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
        if not rest.startswith("visual."):
            raise _Drop("CLIP text tower (carried by mPLUG, never run)")
        name = rest.removeprefix("visual.")
        if name == "proj":
            raise _Drop("CLIP image projection (mPLUG uses the tokens before it)")
        if name.startswith("transformer.score_predictor."):
            raise _Drop("TiMix patch-score predictor (not part of this model)")
        match = _RESBLOCK.match(name)
        if match and match.group(2) in _CLIP_BLOCK:
            return f"visual.vit.blocks.{match.group(1)}.{_CLIP_BLOCK[match.group(2)]}", value
        if name not in _CLIP_TOP:
            raise KeyError(rest)
        if name == "class_embedding":
            value = value.reshape(1, 1, -1)
        elif name == "positional_embedding":
            grid = self.cfg.vision.image_size // self.cfg.vision.patch_size
            value = resize_pos_embed(value.float().unsqueeze(0), grid)
        return f"visual.vit.{_CLIP_TOP[name]}", value

    def fusion(self, rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
        if rest.startswith("embeddings."):
            raise _Drop("fusion embeddings (never run: fusion starts from the text encoder's states)")
        if rest.startswith("cls."):
            return f"mlm_head.{rest.removeprefix('cls.')}", value
        match = _FUSION_LAYER.match(rest)
        if not match:
            raise KeyError(rest)
        i, name = int(match.group(1)), match.group(2)
        j = i - self.fusion_start
        if j < 0:
            raise _Drop(f"dead fusion layer {i} (only layers {self.fusion_start}..{self.fusion_start + len(self.connected) - 1} run)")
        if j < len(self.connected) and self.connected[j] and name.startswith("crossattention."):
            raise _Drop(f"cross-attention of connected fusion layer {i} (never used)")
        return f"fusion.encoder.layer.{j}.{name}", value


_TIED = {"decoder.cls.predictions.decoder.weight": "decoder.bert.embeddings.word_embeddings.weight"}
_BIAS_ALIAS = (".predictions.decoder.bias", ".predictions.bias")  # BERT's LM head: the decoder's bias is that bias


def _bias_alias_of(key: str, state: dict[str, torch.Tensor]) -> str | None:
    """The LM-head bias ``key`` is BERT's tied alias of (``….predictions.decoder.bias`` equal to
    ``….predictions.bias``), else ``None``."""
    alias, bias = _BIAS_ALIAS
    if not key.endswith(alias):
        return None
    source = key[: -len(alias)] + bias
    return source if source in state and torch.equal(state[source], state[key]) else None


def convert_official(state: dict[str, torch.Tensor], cfg: ModelConfig, keep_momentum: bool = False
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], ConversionReport]:
    """Convert an official state dict for model ``cfg`` → ``(online, teacher, report)``.

    ``online`` holds every key of ``MPLUG(cfg)`` the checkpoint provides (fp32); ``teacher`` the momentum copies
    mapped onto ``MPLUG(cfg, teacher=True)`` (empty unless ``keep_momentum``). A shape that does not fit the model
    raises ``ValueError`` naming the key.
    """
    with torch.device("meta"):
        reference = {"": MPLUG(cfg).state_dict(), "_m": MPLUG(cfg, teacher=True).state_dict()}
    fusion_ids = {int(m.group(1)) for k in state
                  if (m := _FUSION_LAYER.match(canonical_name(k).partition(".")[2])) and k.startswith("fusion_encoder.")}
    mapper = _Mapper(cfg, max(fusion_ids) + 1 if fusion_ids else cfg.fusion_layers)
    out: dict[str, dict[str, torch.Tensor]] = {"": {}, "_m": {}}
    report = ConversionReport()
    for key, value in state.items():
        if key in _DROPPED_BUFFERS:
            report.dropped[key] = _DROPPED_BUFFERS[key]
            continue
        alias_of = _bias_alias_of(key, state)
        if alias_of is not None:
            report.dropped[key] = f"alias of {alias_of} (BERT ties the two; the same tensor)"
            continue
        canonical = canonical_name(key)
        component, dot, rest = canonical.partition(".")
        suffix = "_m" if component.endswith("_m") and component.removesuffix("_m") in _COMPONENTS else ""
        base = component.removesuffix("_m") + dot + rest if suffix else canonical
        try:
            target, converted = mapper(base, value)
        except _Drop as reason:
            report.dropped[key] = str(reason)
            continue
        except KeyError:
            report.unexpected.append(key)
            continue
        if suffix and not keep_momentum:
            report.dropped[key] = "momentum copy (pass --keep-momentum to keep it for the teacher)"
            continue
        if target in _TIED:
            report.dropped[key] = f"tied to {_TIED[target]} (our model shares that tensor)"
            continue
        own = reference[suffix].get(target)
        if own is None:
            if suffix:
                report.dropped[key] = "momentum copy of a part our teacher does not have"
            else:
                report.unexpected.append(key)
            continue
        if own.shape != converted.shape:
            raise ValueError(f"'{key}' has shape {tuple(value.shape)} (→ {tuple(converted.shape)} as '{target}'), "
                             f"model '{cfg.name}' expects {tuple(own.shape)}; pick the --model the checkpoint was "
                             f"trained as")
        out[suffix][target] = converted.detach().float().contiguous().clone()
        report.mapped[key] = target if not suffix else f"momentum:{target}"
    for alias, source in _TIED.items():
        if source in out[""]:
            out[""][alias] = out[""][source].clone()
    report.missing = sorted(set(reference[""]) - set(out[""]))
    if keep_momentum:
        report.missing += sorted(f"momentum:{k}" for k in set(reference["_m"]) - set(out["_m"]))
    return out[""], out["_m"], report
