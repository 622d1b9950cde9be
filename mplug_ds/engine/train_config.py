"""The pre-training run configuration: one dataclass tree loaded from ``mplug_ds/configs/pretrain/*.yaml``.

Built once per run (YAML + ``key=value`` overrides), validated before any process starts work, and saved
beside the run's outputs as ``config.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from mplug_ds.config import load_config
from mplug_ds.data.streams import DataSection

Precision = Literal["bf16", "fp16", "fp32"]


@dataclass
class ModelSection:
    """Which mPLUG to build: a named size (``tiny``, ``mplug.en.base`` …) or a YAML path, plus field overrides."""

    name: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {grad_checkpointing: true}
    init_from: str | None = None  # an export directory (tools/export_checkpoint.py) to start from

    def override_list(self) -> list[str]:
        """The overrides as ``key=value`` strings for ``load_model_config``."""
        return [f"{key}={_yaml_scalar(value)}" for key, value in _flatten(self.overrides)]


@dataclass
class BatchSection:
    """Batch geometry; ``global_batch_size`` (optional) must equal micro × accumulation × ranks."""

    micro_batch_per_gpu: int = 8
    grad_accum_steps: int = 1
    global_batch_size: int | None = None


@dataclass
class OptimSection:
    """AdamW with one learning rate for ``visual.*`` and one for everything else."""

    lr: float = 1e-4
    visual_lr: float = 1e-5
    weight_decay: float = 0.02
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class ScheduleSection:
    """Linear warm-up from ``warmup_lr`` then cosine to ``min_lr``, per optimizer step; distillation ramp."""

    total_steps: int = 1000
    warmup_steps: int = 100
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    alpha_warmup_steps: int = 0  # distillation weight ramps linearly from 0 to objective.alpha over these steps


@dataclass
class DeepSpeedSection:
    """Which DeepSpeed JSON template to fill (``zero1``, ``zero2``, ``zero3``, ``zero3_offload`` or a path) and the precision.

    ZeRO-1/2 partition nothing when the data-parallel world is one rank, but still pay for flat buffers, an extra
    fp32 copy of the weights and gradient copies; such runs use stage 0 unless ``zero_on_one_rank`` is true.
    """

    config: str = "zero2"
    precision: Precision = "bf16"
    zero_on_one_rank: bool = False  # keep ZeRO-1/2 on a 1-rank run (default: stage 0, which is faster there)


@dataclass
class CheckpointSection:
    """DeepSpeed checkpoints under ``<output_dir>/checkpoints``."""

    every_steps: int = 500
    keep_last: int = 3
    save_final: bool = True
    # Resume from files that need full unpickling (which can run code): only for checkpoints you trust.
    trust_pickles: bool = False


@dataclass
class LoggingSection:
    """Progress line cadence, metric sinks and the progress bar."""

    every_steps: int = 10
    report_to: list[str] = field(default_factory=lambda: ["none"])  # any of wandb, tensorboard, none
    wandb_project: str = "mplug_ds"
    progress_bar: bool = True


@dataclass
class EvalSection:
    """End-of-run zero-shot retrieval on a held-out split (demo: its test split)."""

    retrieval: bool = True
    max_samples: int = 256
    batch_size: int = 32


@dataclass
class RunSection:
    """Where outputs go and how the run behaves."""

    output_dir: str = "outputs/pretrain"
    seed: int = 42
    deterministic: bool = False  # bit-reproducible kernels (slower); needed for exact resume comparisons
    max_nonfinite_steps: int = 5  # abort after this many non-finite losses in a row
    resume: str | None = None  # None, "auto" (newest complete checkpoint) or a checkpoint path
    # A collective that waits longer than this fails the rank (a peer hung or died): keep it above the slowest
    # checkpoint save and data preparation, since the other ranks wait in a barrier meanwhile.
    collective_timeout_s: float = 600.0


@dataclass
class EngineConfig:
    """The sections the ``Trainer`` reads; every run config (pre-training, a fine-tuning task) extends it."""

    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    run: RunSection = field(default_factory=RunSection)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir).expanduser()

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"


@dataclass
class TrainConfig(EngineConfig):
    """Everything one pre-training run needs: the engine sections plus model, objective, data and eval."""

    model: ModelSection = field(default_factory=ModelSection)
    objective: dict[str, Any] = field(default_factory=dict)  # fields of objectives.pretrain.PretrainConfig
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)


def load_train_config(name_or_path: str | Path = "demo", overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a pre-training config by name (``demo``, ``base``, ``large``) or YAML path, with overrides."""
    return load_config(TrainConfig, "pretrain", name_or_path, overrides)


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in tree.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)

