"""The engine's configuration: the sections every run shares (``EngineConfig``) and the model section.

Each run config extends ``EngineConfig`` with its own sections: pre-training's ``TrainConfig``
(``objectives/pretrain_config.py``), fine-tuning's ``FinetuneConfig`` (``tasks/finetune_config.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


Precision = Literal["bf16", "fp16", "fp32"]


@dataclass
class ModelSection:
    """Which mPLUG to build: a named size (``tiny``, ``mplug.en.base`` …) or a YAML path, plus field overrides."""

    name: str = "tiny"  # a named model (tiny, mplug.en.base, mplug.en.large, ...) or a model YAML path
    overrides: dict[str, Any] = field(default_factory=dict)  # model config fields to change (model.overrides.* keys)
    init_from: str | None = None  # an export / converted directory (export_checkpoint.py, convert_checkpoint.py)
    init_vision_from: str | None = None  # an OpenAI-CLIP or open_clip state-dict file: the ViT (any resolution)
    init_text_from: str | None = None  # a Hugging Face BERT directory: text encoder, fusion and decoder, as mPLUG

    def override_list(self) -> list[str]:
        """The overrides as ``key=value`` strings for ``load_model_config``."""
        return [f"{key}={_yaml_scalar(value)}" for key, value in _flatten(self.overrides)]


@dataclass
class BatchSection:
    """Batch geometry; ``global_batch_size`` (optional) must equal micro × accumulation × ranks."""

    micro_batch_per_gpu: int = 8  # samples per device per forward/backward
    grad_accum_steps: int = 1  # micro-batches accumulated per optimizer step
    global_batch_size: int | None = None  # samples per optimizer step over all ranks; sets grad_accum_steps


@dataclass
class OptimSection:
    """AdamW with one learning rate for ``visual.*`` and one for everything else."""

    lr: float = 1e-4  # peak learning rate of every parameter outside visual.*
    visual_lr: float = 1e-5  # peak learning rate of the vision tower (visual.*)
    weight_decay: float = 0.02  # AdamW decay of matrices (not biases, norms, embeddings, temperature)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping


@dataclass
class ScheduleSection:
    """Linear warm-up from ``warmup_lr`` then cosine to ``min_lr``, per optimizer step; distillation ramp."""

    total_steps: int = 1000  # optimizer steps of the run
    warmup_steps: int = 100  # optimizer steps of linear warm-up from warmup_lr to the peak
    warmup_lr: float = 1e-6  # learning rate at step 0
    min_lr: float = 1e-6  # learning rate at the end of the cosine decay
    alpha_warmup_steps: int = 0  # distillation weight ramps linearly from 0 to objective.alpha over these steps


@dataclass
class DeepSpeedSection:
    """Which DeepSpeed JSON template to fill (a built-in name or a path) and the numeric precision.

    ZeRO-1/2 partition nothing when the data-parallel world is one rank, but still pay for flat buffers, an extra
    fp32 copy of the weights and gradient copies; such runs use stage 0 unless ``zero_on_one_rank`` is true.
    """

    config: str = "zero2"  # DeepSpeed template: zero1, zero2, zero3, zero3_offload or a .json path
    precision: Precision = "bf16"  # bf16, fp16 (CUDA only) or fp32
    zero_on_one_rank: bool = False  # keep ZeRO-1/2 on a 1-rank run (default: stage 0, which is faster there)


@dataclass
class CheckpointSection:
    """DeepSpeed checkpoints under ``<output_dir>/checkpoints``."""

    every_steps: int = 500  # save a checkpoint every this many optimizer steps
    keep_last: int = 3  # complete checkpoints kept (older ones are deleted)
    save_final: bool = True  # save a checkpoint after the last step
    trust_pickles: bool = False  # resume from files needing full unpickling (can run code): trusted checkpoints only


@dataclass
class LoggingSection:
    """Progress line cadence, metric sinks and the progress bar."""

    every_steps: int = 10  # print a progress line every this many steps (metrics.jsonl gets every step)
    report_to: list[str] = field(default_factory=lambda: ["none"])  # metric sinks: any of wandb, tensorboard, none
    wandb_project: str = "mplug_ds"  # wandb project name
    progress_bar: bool = True  # tqdm bar on a terminal


@dataclass
class RunSection:
    """Where outputs go and how the run behaves."""

    output_dir: str = "outputs/pretrain"  # metrics, configs and checkpoints go here
    seed: int = 42  # initial weights, dropout, masking and negatives (per-rank streams derive from it)
    deterministic: bool = False  # bit-reproducible kernels (slower); for exact resume comparisons
    max_nonfinite_steps: int = 5  # abort after this many non-finite losses in a row
    resume: str | None = None  # null, auto (newest complete checkpoint, else fresh) or a checkpoint path
    # A collective that waits longer than this fails the rank (a peer hung or died): keep it above the slowest
    # checkpoint save and data preparation, since the other ranks wait in a barrier meanwhile.
    collective_timeout_s: float = 600.0  # seconds a collective may wait before the rank fails
    # A rank without progress this long stops the job with RUN/hang/report.txt (docs/multi_node.md); the first step
    # of a session and checkpoint saves get 0.9 × collective_timeout_s instead. Below collective_timeout_s.
    hang_timeout_s: float = 0.0  # seconds without progress before the hang report (0: 20 × slowest step, >= 120)
    check_collectives: bool = False  # compare the ranks' collectives and module calls every check_every_steps
    check_every_steps: int = 10  # optimizer steps between two divergence checks (with run.check_collectives)
    # torch intra-op threads per rank when training on CPU (0: torch's default, one per core; OMP_NUM_THREADS wins)
    cpu_threads: int = 0


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

