"""Loading pretrained weights: Hugging Face BERT directories and OpenAI-CLIP / open_clip image towers."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from mplug_ds.models.config import TextConfig
from mplug_ds.models.mplug import MPLUG
from mplug_ds.models.text import BertStack
from mplug_ds.models.vision import VisionEncoder, convert_clip_state_dict
from mplug_ds.runtime import safe_load

_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.*)$")


def read_state_dict(path: str | Path, trusted: bool = False) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` or torch file.

    Torch files are read with the restricted unpickler (``runtime.safe_load``): a file that needs code to load is
    refused naming the file, unless ``trusted``. Training checkpoints are unwrapped from their ``model`` /
    ``module`` / ``state_dict`` key. Legacy BERT names ``LayerNorm.gamma`` / ``.beta`` become ``weight`` / ``bias``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return _modern_names(load_file(str(path)))
    state = safe_load.load(path, trusted)
    for key in ("model", "module", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict (a TorchScript CLIP archive? "
                         "pass the open_clip / OpenAI state-dict file)")
    return _modern_names(state)


def _modern_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``LayerNorm.gamma`` / ``LayerNorm.beta`` (old BERT checkpoints) → ``LayerNorm.weight`` / ``LayerNorm.bias``."""
    return {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
            for k, v in state.items()}


def bert_weights_file(directory: str | Path) -> Path:
    """The weights file of a Hugging Face BERT directory (safetensors preferred)."""
    directory = Path(directory)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(
        f"{directory}: no model.safetensors or pytorch_model.bin; pass a Hugging Face BERT model directory")


def text_config_from_hf(directory: str | Path) -> TextConfig:
    """A ``TextConfig`` with the widths of a Hugging Face BERT ``config.json``."""
    raw = json.loads((Path(directory) / "config.json").read_text())
    return TextConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], heads=raw["num_attention_heads"],
        intermediate_size=raw["intermediate_size"], max_position_embeddings=raw["max_position_embeddings"],
        type_vocab_size=raw["type_vocab_size"], layer_norm_eps=raw["layer_norm_eps"],
        hidden_dropout=raw["hidden_dropout_prob"], attn_dropout=raw["attention_probs_dropout_prob"],
        initializer_range=raw.get("initializer_range", 0.02))


def read_bert(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]],
                                               dict[str, torch.Tensor]]:
    """Split a BERT checkpoint into (embeddings, per-layer tensors, MLM head) with local key names."""
    state = read_state_dict(bert_weights_file(directory))
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    embeddings = {k.removeprefix("embeddings."): v for k, v in state.items()
                  if k.startswith("embeddings.") and not k.endswith("position_ids")}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _LAYER.match(key)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = value
    head = {k.removeprefix("cls."): v for k, v in state.items() if k.startswith("cls.predictions.")}
    return embeddings, layers, head


def load_bert_stack(stack: BertStack, directory: str | Path, first_layer: int = 0) -> list[str]:
    """Fill ``stack`` from a BERT checkpoint: embeddings and layers ``first_layer …``.

    Weights the checkpoint lacks (cross-attention) keep their initialisation; their names are returned.
    Shape mismatches raise with the parameter name.
    """
    embeddings, layers, _ = read_bert(directory)
    state = {f"embeddings.{k}": v for k, v in embeddings.items()}
    for i in range(len(stack.encoder.layer)):
        for key, value in layers.get(first_layer + i, {}).items():
            state[f"encoder.layer.{i}.{key}"] = value
    return _load_partial(stack, state, directory)


def _load_partial(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> list[str]:
    own = module.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"{source}: '{key}' has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(own[key].shape)}; check the model config widths")
    usable = {k: v for k, v in state.items() if k in own}
    missing, _ = module.load_state_dict(usable, strict=False)
    return missing


def init_from_bert(model: MPLUG, directory: str | Path) -> list[str]:
    """Initialise the text side from BERT as mPLUG does.

    text encoder ← embeddings + layers 0…E−1; fusion layer j ← BERT layer (N − F + j) (self-attention and FFN;
    cross-attention stays random); decoder ← embeddings + layers 0…D−1; MLM head ← BERT's MLM head if present.
    Returns the names left at their initialisation.
    """
    _, layers, head = read_bert(directory)
    missing = [f"text_encoder.{k}" for k in load_bert_stack(model.text_encoder, directory)]
    fusion_start = max(0, len(layers) - len(model.fusion.encoder.layer))
    fusion_state = {f"encoder.layer.{j}.{k}": v
                    for j in range(len(model.fusion.encoder.layer))
                    for k, v in layers.get(fusion_start + j, {}).items()}
    missing += [f"fusion.{k}" for k in _load_partial(model.fusion, fusion_state, directory)]
    if getattr(model, "decoder", None) is not None:
        missing += [f"decoder.bert.{k}" for k in load_bert_stack(model.decoder.bert, directory)]
    if head:
        missing += [f"mlm_head.{k}" for k in _load_partial(model.mlm_head, head, directory)]
    return missing


def load_clip_visual(encoder: VisionEncoder, path_or_state: str | Path | dict[str, torch.Tensor]) -> int:
    """Load an OpenAI-CLIP or open_clip checkpoint's image tower (any resolution; pos-embed resized).

    Returns the number of tensors loaded; a missing, unexpected or wrongly shaped tensor raises naming the key.
    """
    source = "CLIP state dict" if isinstance(path_or_state, dict) else path_or_state
    state = path_or_state if isinstance(path_or_state, dict) else read_state_dict(path_or_state)
    converted = convert_clip_state_dict(state, encoder)
    missing = _load_partial(encoder.vit, converted, source)
    unexpected = sorted(set(converted) - set(encoder.vit.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{source}: does not match the vision config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return len(converted)



def init_public_weights(model: MPLUG, vision_file: str | Path | None, bert_dir: str | Path | None) -> list[str]:
    """Initialise from public weights as mPLUG does (``model.init_vision_from`` / ``model.init_text_from``).

    Returns the load report: one line per source with what was loaded and what stayed at its initialisation.
    """
    report = []
    if vision_file:
        count = load_clip_visual(model.visual, Path(vision_file).expanduser())
        report.append(f"init: ViT <- {vision_file}: {count} tensors loaded (positional embedding at "
                      f"{model.cfg.vision.image_size}px)")
    if bert_dir:
        left = init_from_bert(model, Path(bert_dir).expanduser())
        loaded = sum(1 for k in model.state_dict() if k.startswith(("text_encoder.", "fusion.", "decoder.", "mlm_head."))
                     ) - len(left)
        collapsed = (re.sub(r"\.\d+\.", ".*.", k) for k in left)
        groups = sorted({k[:k.index("crossattention") + 14] if "crossattention" in k else k for k in collapsed})
        report.append(f"init: text side <- {bert_dir}: {loaded} tensors loaded; {len(left)} left at their "
                      f"initialisation ({', '.join(groups)})")
    return report
