"""Build the DeepSpeed config dict from a ``mplug_ds/configs/deepspeed/*.json`` template and the run config.

Templates leave batch sizes, accumulation, clipping and precision as ``"auto"``; they are filled from the
training config so the numbers can never disagree. A template value that is set explicitly must agree with
ours, otherwise a ``ConfigError`` names the key.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mplug_ds.config import CONFIG_ROOT, ConfigError, config_path
from mplug_ds.engine.train_config import EngineConfig

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

DS_CONFIG_DIR = CONFIG_ROOT / "deepspeed"  # shipped in the package; ds_configs/ at the repository root links here

# Top-level keys DeepSpeed understands (a misspelt key would otherwise be silently ignored by DeepSpeed).
KNOWN_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "bf16", "bfloat16", "fp16", "amp", "torch_autocast", "zero_optimization",
    "activation_checkpointing", "communication_data_type", "prescale_gradients", "gradient_predivide_factor",
    "sparse_gradients", "data_types", "tensorboard", "wandb", "csv_monitor", "comet", "flops_profiler",
    "checkpoint", "aio", "dump_state", "optimizer", "scheduler", "dataloader_drop_last", "compile",
    "seq_parallel_communication_data_type", "timers", "comms_logger", "elasticity", "autotuning",
    "disable_allgather", "graph_harvesting", "use_data_before_expert_parallelism", "zero_quantized_weights",
    "zero_quantized_gradients", "nebula", "pipeline", "curriculum_learning", "data_efficiency",
    "compression_training", "sparse_attention", "gradient_allreduce_op", "weight_quantization",
})


def resolve_ds_template(name_or_path: str) -> Path:
    """A template path: an existing JSON file, or a built-in name (``zero1`` … ``zero3_offload``)."""
    try:
        return config_path("deepspeed", name_or_path, suffix=".json")
    except ConfigError as err:
        raise ConfigError(f"deepspeed.config: {err}") from None


def load_ds_template(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    """Read a DeepSpeed JSON template; a parse error names the file and line."""
    path = resolve_ds_template(name_or_path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return path, data


def build_ds_config(cfg: EngineConfig, world_size: int, keep_zero: bool = False) -> dict[str, Any]:
    """The DeepSpeed config for this run: template + batch geometry, clipping and precision from ``cfg``.

    ``keep_zero``: keep the template's ZeRO stage on one rank too (resuming a checkpoint written under ZeRO).
    """
    path, template = load_ds_template(cfg.deepspeed.config)
    unknown = sorted(set(template) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown DeepSpeed key '{unknown[0]}'; check its spelling")
    check_zero_section(path, template.get("zero_optimization", {}))
    for owned in ("optimizer", "scheduler"):
        if owned in template:
            raise ConfigError(f"{path}: remove '{owned}': the engine builds AdamW with per-group learning rates "
                              "and steps the schedule itself (set them under optim/schedule in the YAML)")
    micro, accum = cfg.batch.micro_batch_per_gpu, cfg.batch.grad_accum_steps
    global_batch = micro * accum * world_size
    ds = copy.deepcopy(template)
    _fill(ds, path, "train_micro_batch_size_per_gpu", micro)
    _fill(ds, path, "gradient_accumulation_steps", accum)
    _fill(ds, path, "train_batch_size", global_batch)
    _fill(ds, path, "gradient_clipping", cfg.optim.grad_clip)
    precision = cfg.deepspeed.precision
    for key in ("bf16", "fp16"):
        block = ds.setdefault(key, {})
        if not isinstance(block, dict):
            raise ConfigError(f"{path}: '{key}' must be an object like {{\"enabled\": \"auto\"}}")
        want = precision == key
        if block.get("enabled", "auto") not in ("auto", want):
            raise ConfigError(
                f"{path}: '{key}.enabled' is {block['enabled']} but deepspeed.precision is '{precision}'; "
                f"set '{key}.enabled' to \"auto\" (precision is chosen by deepspeed.precision)")
        block["enabled"] = want
    for key in ("amp", "bfloat16"):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled"):
            raise ConfigError(f"{path}: '{key}.enabled' conflicts with deepspeed.precision='{precision}'; "
                              f"remove the '{key}' block")
    if precision != "fp16":
        ds.pop("fp16")
    if precision != "bf16":
        ds.pop("bf16")
    one_rank_zero = world_size == 1 and zero_stage(ds) in (1, 2) and not offloads_optimizer(ds)
    if one_rank_zero and not (cfg.deepspeed.zero_on_one_rank or keep_zero):
        ds["zero_optimization"] = {"stage": 0}  # nothing to partition; see DeepSpeedSection
    return ds


def check_zero_section(path: Path, zero: Any) -> None:
    """Check ``zero_optimization`` against DeepSpeed's own schema (stage, nested keys such as ``offload_optimizer``)
    so a misspelt key or a stage that does not exist is reported before any process starts."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: 'zero_optimization' must be an object like {{\"stage\": 2}}")
    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        fix = "check its spelling (see DeepSpeed's ZeRO config docs)" if first["type"] == "extra_forbidden" else \
            "choose an allowed value"
        raise ConfigError(f"{path}: 'zero_optimization.{key}': {first['msg']}; {fix}") from None


def zero_stage(ds: dict[str, Any]) -> int:
    """The ZeRO stage of a built DeepSpeed config (0 when absent)."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    """True when the optimizer state lives on the CPU (DeepSpeed's CPU Adam is then used)."""
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def skip_one_rank_allreduce(engine: DeepSpeedEngine) -> None:
    """Skip DeepSpeed's stage-0 gradient all-reduce when the data-parallel world is one rank.

    On one rank it is an identity that still flattens every gradient into a bucket and copies it back.
    """
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False


def _fill(ds: dict[str, Any], path: Path, key: str, value: Any) -> None:
    current = ds.get(key, "auto")
    if current != "auto" and current != value:
        raise ConfigError(
            f"{path}: '{key}' is {current} but the training config gives {value} (from batch.* / optim.*); "
            f"set '{key}' to \"auto\" in the JSON and choose it in the YAML")
    ds[key] = value
