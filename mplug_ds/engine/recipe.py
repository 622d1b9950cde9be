"""The component a run plugs into the ``Trainer``: what is trained, on which batches, and how it is judged.

The ``Trainer`` owns what every training run shares: DeepSpeed, the optimizer and learning-rate schedule,
gradient accumulation, the non-finite guard, checkpoints and exact resume, logging and SIGTERM handling. A
``Recipe`` owns the rest. Pre-training is one recipe (``objectives/pretrain_recipe.py``); fine-tuning tasks
and TiMix are others. The ``Trainer`` calls, in this order::

    recipe = make_recipe(world)            after torch.distributed is up and every rank is seeded alike, so the
                                           model built here starts from the same weights on every rank
    deepspeed.initialize(recipe.module)    the optimizer gets recipe.module's trainable parameters, in groups
                                           that also differ by recipe.param_group_key(param)
    recipe.engine_ready(engine)
    recipe.train_stream()                  once; resumed with its state_dict
    recipe.evaluate(engine)                before the first step of a run started afresh, when evaluate_at_start
    per optimizer step:  engine(batch, **recipe.step_args(step), **phase) -> losses; backward; step (once per
                         phase in recipe.phases(step), normally one);
                         recipe.after_optimizer_step() when the step was applied
    at each checkpoint:  recipe.extra_state() (rank 0 saves it) and recipe.sharded_state() (every rank saves its
                         own); restored with load_extra_state(state, shard_files) on resume
    every eval_every_steps steps and at the end:  recipe.evaluate(engine) -> metrics (logged; with ``metric``
                         set, the best checkpoint so far is recorded in checkpoints/best.json and kept)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from mplug_ds.data.batch import Batch


class TrainStream(Protocol):
    """An endless, resumable batch source: ``iter()`` yields batches forever; its position saves and restores."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Recipe:
    """Base class of recipes; override what your objective needs (only ``module`` and ``train_stream`` are required).

    ``module``: the ``nn.Module`` DeepSpeed wraps and the optimizer trains. ``module(batch, **step_args)`` returns a
    dict of 0-dim loss tensors; ``"loss"`` is the one back-propagated. Parameters named ``visual.*`` (at any depth)
    get ``optim.visual_lr``. ``loss_keys``: the entries of that dict logged every step, ``"loss"`` first; every
    rank must return all of them. State kept outside ``module`` (a momentum teacher) is the recipe's to save via
    ``extra_state``.
    """

    module: nn.Module
    loss_keys: tuple[str, ...] = ("loss",)
    eval_every_steps: int = 0  # also call ``evaluate`` every this many optimizer steps (0: only at the end)
    metric: str | None = None  # the ``evaluate`` metric (higher is better) that picks the best checkpoint
    evaluate_at_start: bool = False  # also evaluate before the first step (logged at step 0; picks no checkpoint)

    def train_stream(self) -> TrainStream:
        """This rank's training stream (called once, after ``engine_ready``)."""
        raise NotImplementedError

    def step_args(self, step: int) -> dict[str, float]:
        """Keyword arguments of ``module.forward`` for the optimizer step after ``step`` completed steps
        (e.g. a distillation weight ramp); they are logged with the losses."""
        return {}

    def param_group_key(self, param: nn.Parameter) -> str:
        """Parameters with different keys never share an optimizer group (default: one key). The momentum teacher
        keeps its parameters apart so that its partitions line up with the optimizer's."""
        return ""

    def phases(self, step: int) -> tuple[dict[str, Any], ...]:
        """Extra ``module.forward`` keyword arguments, one dict per forward/backward/optimizer step that each
        micro-batch gets in optimizer step ``step``. Default: one (everything in one step). More than one (TiMix's
        reference three-step order) needs ``batch.grad_accum_steps`` 1; every phase returns every loss key and
        the logged value of a key is its sum over the phases."""
        return ({},)

    def engine_ready(self, engine: Any) -> None:
        """Called once after ``deepspeed.initialize`` (e.g. to move state kept outside the engine to its device)."""

    def after_optimizer_step(self) -> None:
        """Called on every rank after each applied optimizer step (e.g. an EMA update; may run collectives)."""

    def evaluate(self, engine: Any) -> dict[str, float]:
        """End-of-run metrics (called on every rank; may run collectives). Default: none."""
        return {}

    def extra_state(self) -> dict[str, torch.Tensor] | None:
        """Tensors kept outside ``module``, identical on every rank, that a checkpoint must hold (rank 0's copy is
        saved), or ``None``."""
        return None

    def sharded_state(self) -> dict[str, Any] | None:
        """This rank's share of state partitioned over the ranks (tensors and plain data; every rank's is saved),
        or ``None``."""
        return None

    def load_extra_state(self, state: dict[str, torch.Tensor] | None, shard_files: list[Path]) -> None:
        """Restore what ``extra_state`` returned (``None`` when the checkpoint holds none) and what
        ``sharded_state`` returned: ``shard_files`` are every saving rank's file (empty when none), saved by any
        number of ranks."""

    def saved_configs(self) -> dict[str, dict[str, Any]]:
        """Resolved configs to write beside the run as YAML, by file name (e.g. ``model_config.yaml``)."""
        return {}
