"""The training loop on DeepSpeed, for any ``Recipe``: initialise, accumulate, guard, step, schedule, log, checkpoint.

One ``Trainer`` per process. Every rank runs the same sequence of collectives: one small all-reduce per
micro-batch carries the losses, the non-finite flag and the stop (SIGTERM) flag, so all ranks skip, stop
and checkpoint at the same step.

Host synchronisations. Per micro-batch there is exactly one: the result of that all-reduce is copied to the host
(``_agree``), because a batch with a non-finite loss must be skipped before its backward; the logged losses travel
in the same copy. With more than one rank, the ranks also agree on pending stop requests before each fetch (one
scalar all-reduce, ``_any_rank``). Everything else the loop reads on the host (learning rates, whether the step was
applied, peak memory) is per optimizer step. ``optimizer_step`` is the one training step: ``tools/benchmark.py``
times this same method.

Communication. Every collective of an optimizer step is counted by part and kind (``runtime/collectives``) and
logged with the step as ``comm``: ``{part: {kind: {"calls", "bytes"}}}``. Parts: ``zero`` (DeepSpeed's own
gradient and parameter traffic), ``agreement`` (the loop's loss / non-finite / stop all-reduces), ``data_health``
(skipped-sample counts, on logging steps), and whatever the recipe names (``ita``, ``teacher_forward``,
``teacher_update``, ...); ``other`` is anything unnamed. What runs between steps (checkpoints, evaluation) is not
counted.

Hangs. ``train()`` runs the hang watchdog (``runtime/watchdog.py``): the loop reports each step, micro-batch,
evaluation and checkpoint as progress, and a rank without progress for ``run.hang_timeout_s`` stops every rank with
``RUN/hang/report.txt``. With ``run.check_collectives`` the ranks also compare their collectives and module calls
every ``run.check_every_steps`` steps (``runtime/divergence.py``) and stop at the first difference.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import deepspeed
import torch
import torch.distributed as dist
import yaml
from deepspeed.accelerator import get_accelerator

from mplug_ds.config import to_dict
from mplug_ds.data.batch import Batch
from mplug_ds.engine.checkpoint import CheckpointManager, TrainState, resolve_resume
from mplug_ds.engine.data_health import SkippedSamples, warning_line
from mplug_ds.engine.ds_config import offloads_optimizer, skip_one_rank_allreduce
from mplug_ds.engine.logging import RunLogger, peak_memory_gb
from mplug_ds.engine.recipe import Recipe
from mplug_ds.engine.schedule import WarmupCosine, group_lr, param_groups
from mplug_ds.engine.train_config import EngineConfig
from mplug_ds.engine.validate import ResolvedEngine
from mplug_ds.runtime import collectives, watchdog
from mplug_ds.runtime.atomic import atomic_write_text
from mplug_ds.runtime.divergence import DivergenceCheck
from mplug_ds.runtime.failure import LauncherWatch
from mplug_ds.runtime.guards import NonFiniteGuard, StopRequest
from mplug_ds.runtime.launch_env import WorldInfo, init_distributed
from mplug_ds.runtime.rng import rng_state, seed_everything, set_deterministic, set_rng_state

log = logging.getLogger("mplug_ds.train")


@dataclass
class RunSummary:
    """What a finished (or stopped) run reports."""

    steps: int
    losses: dict[str, tuple[float, float]]  # per loss key: (mean of the first steps, mean of the last steps)
    samples_per_s: float | None  # this session's training samples over its wall time (all ranks)
    retrieval: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    stopped_by_signal: bool = False
    skipped_batches: int = 0
    output_dir: str = ""
    skipped_samples: dict[str, dict[str, float]] = field(default_factory=dict)  # per source, over all ranks
    warnings: list[str] = field(default_factory=list)


class Trainer:
    """Builds the recipe, DeepSpeed engine, data stream and bookkeeping for one run; ``train()`` runs it.

    ``make_recipe(world)`` builds the ``Recipe`` (see ``mplug_ds.engine.recipe``) once the ranks are seeded alike.
    """

    def __init__(self, cfg: EngineConfig, resolved: ResolvedEngine, world: WorldInfo,
                 make_recipe: Callable[[WorldInfo], Recipe]) -> None:
        self.cfg, self.resolved, self.world = cfg, resolved, world
        set_deterministic(cfg.run.deterministic)
        init_distributed(cfg.run.collective_timeout_s)
        accel = get_accelerator()
        if accel.device_name() == "cuda":
            accel.set_device(world.local_rank)
        self.device = torch.device(accel.device_name(world.local_rank) if accel.device_name() == "cuda" else "cpu")

        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        self.recipe = make_recipe(world)
        optimizer = self._optimizer()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.recipe.module, optimizer=optimizer, config=resolved.ds_config, dist_init_required=False)
        self.recipe.engine_ready(self.engine)
        skip_one_rank_allreduce(self.engine)
        run = cfg.run
        self.divergence = (DivergenceCheck(self.engine.module, run.check_every_steps, self.device)
                           if run.check_collectives and world.world_size > 1 else None)
        seed_everything(cfg.run.seed + 1000 * world.rank + 1)  # per-rank dropout / masking / negatives

        self.schedule = WarmupCosine(cfg.schedule)
        self.state = TrainState()
        self.guard = NonFiniteGuard(cfg.run.max_nonfinite_steps)
        self.checkpoints = CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint.keep_last,
                                             cfg.checkpoint.trust_pickles)
        self.stream = self.recipe.train_stream()
        self.losses: list[dict[str, float]] = []
        self.session_samples, self.session_seconds = 0, 0.0
        self.last_checkpoint: Path | None = None
        self.last_metrics: dict[str, float] = {}
        self.logger = RunLogger(cfg.output_dir, world.rank, cfg.schedule.total_steps, cfg.logging.every_steps,
                                resolved.report_to, to_dict(cfg), cfg.logging.progress_bar,
                                cfg.logging.wandb_project)
        self.skipped = SkippedSamples(self.stream, world.world_size, self._warn)

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        groups = param_groups(self.recipe.module, o, self.recipe.param_group_key)
        if offloads_optimizer(self.resolved.ds_config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
        # One fused kernel per parameter group (CPU and CUDA): no temporaries the size of the model.
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)

    # ------------------------------------------------------------------ run
    def train(self) -> RunSummary:
        """Run to ``schedule.total_steps`` (or until SIGTERM); returns the summary (rank 0 has the metrics)."""
        self._save_resolved_config()
        stop = StopRequest()
        watch = LauncherWatch(stop.request)
        try:
            with self.watching():
                summary = self._train(stop)
            stop.restore()  # after a failure SIGTERM stays a flag: the launcher stopping the others must not end
            return summary  # this rank before its part of the hang report is written (runtime/failure.py)
        finally:
            watch.stop()
            self.logger.close()
            if self.divergence is not None:
                self.divergence.close()

    @contextmanager
    def watching(self) -> Iterator[watchdog.HangWatchdog]:
        """Run the hang watchdog inside (a collective to enter: the ranks agree on the report's session)."""
        run = self.cfg.run
        dog = watchdog.HangWatchdog(self.cfg.output_dir, self.world, run.hang_timeout_s,
                                    watchdog.LONG_FRACTION * run.collective_timeout_s, self.stream.state_dict)
        dog.start()
        try:
            yield dog
        finally:
            dog.stop()

    def _train(self, stop: StopRequest) -> RunSummary:
        """The loop of ``train``."""
        cfg = self.cfg
        watchdog.phase("start-up", self.state.step, long=True)
        data = self.resume_or_start()
        if self.divergence is not None:
            self.divergence.resume_at(self.state.step)
        if self.recipe.evaluate_at_start and self.state.step == 0:  # e.g. a fine-tuning's zero-shot figure
            watchdog.phase("evaluation", 0, long=True)  # the session's first forward passes warm up
            with parameters_found_on_use(self.engine):
                self.last_metrics = self.recipe.evaluate(self.engine)
            if self.last_metrics:
                self.logger.evaluation(0, False, self.last_metrics)
        stopped = False
        every_eval = self.recipe.eval_every_steps
        while self.state.step < cfg.schedule.total_steps and not stopped:
            stopped = self.optimizer_step(data, stop)
            due = self.state.step % cfg.checkpoint.every_steps == 0
            eval_due = (not stopped and every_eval > 0 and self.state.step % every_eval == 0
                        and self.state.step < cfg.schedule.total_steps)
            best = eval_due and self._evaluate_for_best()
            if (stopped or due or best) and not self._saved_at_current_step():
                self._checkpoint()
            if best:
                self._mark_best()
        if not stopped and cfg.checkpoint.save_final and not self._saved_at_current_step():
            self._checkpoint()
        if stopped:
            cause = stop.cause if stop.requested else "another rank was asked to stop"
            self.logger.info(f"{cause}: saved {self.last_checkpoint} at step {self.state.step}; "
                             "resume with --resume auto")
        if not stopped and self._evaluate_for_best(final=True) and self._saved_at_current_step():
            self._mark_best()
        retrieval = self.last_metrics
        summary = self._summary(retrieval, stopped, self.skipped.gather())
        self.logger.event("summary", **dataclasses.asdict(summary))
        return summary

    def resume_or_start(self) -> Iterator[Batch]:
        """Restore the newest/asked-for checkpoint (``run.resume``) if any; returns the training batch iterator."""
        tag_dir = resolve_resume(self.cfg.run.resume, self.cfg.checkpoint_dir)
        if tag_dir is None:
            self.logger.event("start", world_size=self.world.world_size, ds_config=self.resolved.ds_config)
            return iter(self.stream)
        state, rank_state, extra, shards = self.checkpoints.load(self.engine, tag_dir)
        self.state = state
        try:
            self.recipe.load_extra_state(extra, shards)
        except RuntimeError as err:
            raise RuntimeError(f"{tag_dir}: {err}") from None
        if "data_by_rank" in rank_state:  # written by another number of ranks
            if not hasattr(self.stream, "load_resharded"):
                raise RuntimeError(f"{tag_dir} was written by {len(rank_state['data_by_rank'])} ranks and this run's "
                                   f"data stream ({type(self.stream).__name__}) cannot re-split its position; resume "
                                   "on the same number of ranks")
            try:
                self.stream.load_resharded(rank_state["data_by_rank"])
            except ValueError as err:
                raise RuntimeError(f"{tag_dir}: {err}") from None
        else:
            self.stream.load_state_dict(rank_state["data"])
        data = iter(self.stream)
        # Last: creating the data iterator may draw from the generators. A rank the checkpoint did not have starts
        # generators of its own, derived from (seed, rank, step) so the resumed run is reproducible.
        if rank_state["rng"] is not None:
            set_rng_state(rank_state["rng"])
        else:
            seed_everything(self.cfg.run.seed + 1000 * self.world.rank + 1 + 7919 * state.step)
        self.last_checkpoint = tag_dir
        dropped = self.logger.drop_steps_after(state.step)
        self.logger.event("resume", checkpoint=str(tag_dir), superseded_records=dropped, world_size=self.world.world_size,
                          grad_accum_steps=self.cfg.batch.grad_accum_steps, **dataclasses.asdict(state))
        self.logger.info(f"resumed from {tag_dir} at step {state.step} ({state.samples_seen} samples seen)")
        return data

    def optimizer_step(self, data: Iterator[Batch], stop: StopRequest) -> bool:
        """Accumulate one optimizer step of finite micro-batches; returns True when a stop was requested.

        Before each batch is fetched the ranks agree on pending stop requests: a SIGTERM sent to the whole
        process group also kills the DataLoader workers, so no batch is fetched once a stop is known.
        """
        cfg, engine, keys = self.cfg, self.engine, self.recipe.loss_keys
        accum = cfg.batch.grad_accum_steps
        self.schedule.apply(self.optimizer, self.state.step)
        step_args = self.recipe.step_args(self.state.step)
        phases = self.recipe.phases(self.state.step)
        sums = torch.zeros(len(keys), dtype=torch.float64)
        collectives.take_counts()  # drop what ran since the last step (checkpoint, evaluation)
        data_time = compute_time = 0.0
        started = time.perf_counter()
        good = 0
        stop_requested = False
        watchdog.phase("train", self.state.step + 1, long=self.session_samples == 0)  # the first step warms up
        while good < accum:
            watchdog.beat(micro_batch=f"{good + 1}/{accum}", samples_seen=self.state.samples_seen)
            if self._any_rank(stop.requested):
                if good:
                    self.logger.info(f"stopping inside step {self.state.step + 1}: its {good} accumulated "
                                     "micro-batch(es) are dropped (the checkpoint is taken at the last full step)")
                return True
            t0 = time.perf_counter()
            batch = {k: v.to(engine.device, non_blocking=True) for k, v in next(data).items()}
            t1 = time.perf_counter()
            batch_losses, finite = torch.zeros_like(sums), True
            for phase in phases:  # one phase unless the recipe asks for several optimizer steps per batch
                out = engine(batch, **step_args, **phase)
                losses, nonfinite, stop_any = self._agree(out, stop.requested)
                stop_requested |= stop_any
                if self.guard.observe(not nonfinite):
                    self.state.skipped_batches += 1
                    self.logger.event("skipped_batch", step=self.state.step + 1,
                                      **{k: float(v) for k, v in zip(keys, losses)})
                    self.logger.info(f"warning: non-finite loss before step {self.state.step + 1} "
                                     f"({', '.join(f'{k}={v:.4g}' for k, v in zip(keys, losses.tolist()))}); "
                                     f"batch skipped ({self.guard.in_row} in a row)")
                    del out
                    finite = False
                    break  # with several phases, the ones already stepped stay applied
                engine.backward(out["loss"])
                engine.step()
                batch_losses += losses
            data_time += t1 - t0
            compute_time += time.perf_counter() - t1
            if finite:
                sums += batch_losses
                good += 1
        if engine.was_step_applied():
            self.recipe.after_optimizer_step()
        global_batch = cfg.batch.micro_batch_per_gpu * accum * self.world.world_size
        self.state.step += 1
        self.state.samples_seen += global_batch
        self.state.epoch = getattr(self.stream, "epoch", 0)
        elapsed = time.perf_counter() - started
        means = (sums / accum).tolist()
        self.losses.append(dict(zip(keys, means)))
        self.session_samples += global_batch
        self.session_seconds += elapsed
        record = {"step": self.state.step, "epoch": self.state.epoch, "samples": self.state.samples_seen,
                  **dict(zip(keys, means)),
                  "lr": group_lr(self.optimizer, visual=False), "visual_lr": group_lr(self.optimizer, visual=True),
                  **step_args, "samples_per_s": global_batch / elapsed, "data_time": data_time,
                  "compute_time": compute_time, "peak_mem_gb": peak_memory_gb(self.device),
                  "overflow": not engine.was_step_applied()}
        if self.state.step % cfg.logging.every_steps == 0 or self.state.step == cfg.schedule.total_steps:
            with collectives.part("data_health"):
                record["skipped"] = self.skipped.gather()  # a collective: the same steps on every rank
        record["comm"] = collectives.take_counts()
        self.logger.step(record)
        if self.divergence is not None:
            self.divergence.end_step(self.state.step)
        return stop_requested

    def _agree(self, out: dict[str, torch.Tensor], stop_local: bool) -> tuple[torch.Tensor, bool, bool]:
        """All-reduce (mean losses, any non-finite, any stop request) across ranks in one collective.

        The flags are computed on the device; the single host copy at the end is this micro-batch's one sync.
        """
        keys = self.recipe.loss_keys
        n = len(keys)
        values = torch.stack([out[k].detach() for k in keys]).double()
        nonfinite = (~torch.isfinite(values)).any().double().reshape(1)
        stop = torch.full((1,), float(stop_local), dtype=torch.float64, device=values.device)
        packed = torch.cat([values, nonfinite, stop])
        if self.world.world_size > 1:
            with collectives.part("agreement"):
                dist.all_reduce(packed)
            packed[:n] /= self.world.world_size
        packed = packed.cpu()
        return packed[:n], bool(packed[n] > 0), bool(packed[n + 1] > 0)

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if self.world.world_size == 1:
            return flag
        packed = torch.tensor([float(flag)], device=self.engine.device)
        with collectives.part("agreement"):
            dist.all_reduce(packed)
        return bool(packed.item() > 0)

    # ------------------------------------------------------------------ checkpoints / outputs
    def _checkpoint(self) -> None:
        watchdog.phase("checkpoint", self.state.step, long=True)  # every rank waits for the slowest writer
        rank_state = {"rng": rng_state(), "data": self.stream.state_dict()}
        self.last_checkpoint = self.checkpoints.save(self.engine, self.state, rank_state, self.recipe.extra_state(),
                                                     self.recipe.sharded_state())
        self.logger.event("checkpoint", step=self.state.step, path=str(self.last_checkpoint))

    def _saved_at_current_step(self) -> bool:
        return self.last_checkpoint is not None and self.last_checkpoint.name == f"step_{self.state.step:08d}"

    def _save_resolved_config(self) -> None:
        if self.world.rank != 0:
            return
        out = self.cfg.output_dir
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        for name, section in self.recipe.saved_configs().items():
            atomic_write_text(out / name, yaml.safe_dump(section, sort_keys=False))
        atomic_write_text(out / "ds_config.json", json.dumps(self.resolved.ds_config, indent=2))

    def _evaluate_for_best(self, final: bool = False) -> bool:
        """Evaluate (a collective), log the metrics; True when the recipe's metric improved on the best so far."""
        watchdog.phase("evaluation", self.state.step)
        self.last_metrics = self.recipe.evaluate(self.engine)
        if self.last_metrics:  # a recipe without evaluation (or a rank without the gathered metrics) logs nothing
            self.logger.evaluation(self.state.step, final, self.last_metrics)
        metric = self.recipe.metric
        best = self.checkpoints.best()
        improved = metric in self.last_metrics and (best is None or self.last_metrics[metric] > best["value"])
        return self._rank0_decides(improved)  # metrics may exist on rank 0 only

    def _rank0_decides(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        if self.world.world_size == 1:
            return flag
        packed = torch.tensor([float(flag)], device=self.engine.device)
        dist.broadcast(packed, src=0)
        return bool(packed.item() > 0)

    def _mark_best(self) -> None:
        if self.world.rank != 0:
            return
        metric = self.recipe.metric
        self.checkpoints.mark_best(self.last_checkpoint, metric, self.last_metrics[metric])
        self.logger.event("best_checkpoint", step=self.state.step, metric=metric, value=self.last_metrics[metric],
                          path=str(self.last_checkpoint))

    def _warn(self, line: str) -> None:
        self.logger.info(line)
        self.logger.event("warning", message=line)

    def _summary(self, retrieval: dict[str, float], stopped: bool,
                 skipped: dict[str, dict[str, float]]) -> RunSummary:
        window = max(1, min(10, len(self.losses) // 10))
        first, last = self.losses[:window], self.losses[-window:]
        losses = {k: (sum(r[k] for r in first) / len(first), sum(r[k] for r in last) / len(last))
                  for k in self.recipe.loss_keys} if self.losses else {}
        throughput = self.session_samples / self.session_seconds if self.session_seconds else None
        return RunSummary(steps=self.state.step, losses=losses, samples_per_s=throughput, retrieval=retrieval,
                          checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
                          stopped_by_signal=stopped, skipped_batches=self.state.skipped_batches,
                          output_dir=str(self.cfg.output_dir), skipped_samples=skipped,
                          warnings=[warning_line(name, entry, self.skipped.warn_fraction)
                                    for name, entry in skipped.items() if name in self.skipped.warned])


@contextmanager
def parameters_found_on_use(engine: deepspeed.DeepSpeedEngine) -> Iterator[None]:
    """Under ZeRO-3, a parameter read outside its own module's forward (a ViT's class token read by
    ``forward_features``, a model-level temperature) is gathered when it is read — as DeepSpeed does inside the
    engine's forward, which also registers it with the module that read it for every later call. An evaluation
    before the first training step runs outside any engine forward and needs this; no effect without ZeRO-3."""
    flags = [m._parameters for m in engine.module.modules() if hasattr(m._parameters, "_in_forward")]
    for flag in flags:
        flag._in_forward = True
    try:
        yield
    finally:
        for flag in flags:
            flag._in_forward = False
