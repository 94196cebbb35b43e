"""The training loop: read it top to bottom. Objectives plug in as Tasks (``objectives/``: causal LM, masked
LM, image classification, MAE, CLIP/SigLIP, SFT, DPO, text classification): the data, model, micro-batch
loss and validation metrics. How the weights start and what trains is one object (``finetune/base.py``);
what keeps a run alive (signals, loss spikes, out-of-memory) is ``resilience.py``; the run directory and
``--resume`` are ``rundir.py``.

A run is fully described by its resolved config; everything it makes goes into ``train.out_dir``:
``config.yaml``, ``metrics.jsonl``, ``tb/``, ``checkpoints/step_NNNNNNN/`` and, at the end,
``model.safetensors`` + ``model.json`` + ``tokenizer.json``. SIGTERM/SIGINT write a checkpoint and return
cleanly; ``resume="auto"`` continues bit-for-bit where the newest valid checkpoint left off.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from fmforge.config import Config, config_to_dict, save_config
from fmforge.data.loader import Prefetcher
from fmforge.data.staging import stage_prepared_data
from fmforge.device import autocast_for
from fmforge.errors import FmforgeError
from fmforge.finetune.base import FromScratch, start_for
from fmforge.io.fs import is_remote
from fmforge.models.registry import is_decoder
from fmforge.objectives import make_task
from fmforge.objectives.base import Task
from fmforge.train import checkpoint as ckpt
from fmforge.train import mirror
from fmforge.train.distributed import (
    DistInfo,
    any_rank,
    barrier,
    gather_floats,
    init_distributed,
    mean_across_ranks,
    preflight,
    run_on_main,
    shutdown,
)
from fmforge.train.memory import describe, estimate_memory
from fmforge.train.metrics import MetricsLogger, device_peak_tflops, peak_memory_gb
from fmforge.train.optim import build_optimizer, build_scheduler
from fmforge.train.parallel import (
    Layout,
    build_layout,
    clip_grad_norm,
    materialize,
    parallelize,
    uses_fsdp,
    wrap_ddp,
)
from fmforge.train.resilience import SpikeDetector, StopFlag, halve_micro_batch, micro_batch_hint
from fmforge.train.rundir import checkpoint_places, prepare_run_dir, unlock_run_dir, with_absolute_paths


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float | None
    val_loss: float | None
    preempted: bool
    pruned: bool = False  # stopped early because ``on_validation`` asked to (hyperparameter search)


def train(cfg: Config, resume: str | None = None, echo=print,
          on_validation: Callable[[int, float], bool] | None = None) -> TrainResult:
    """Train the model described by ``cfg`` with the objective its ``model.arch`` (or ``finetune.task``)
    implies (see ``objectives/``). ``resume``: None, "auto" or a checkpoint directory. ``cfg`` itself is
    not changed: the resolved config is written to the run directory.

    Run it as one process, or under torchrun for data parallelism (DDP / FSDP2 / HSDP per
    ``parallel.dp``): every rank runs this same function on its slice of each global batch.

    ``on_validation(step, val_loss)`` is called on the main rank after each periodic validation; returning
    True ends the run there (no checkpoint, no final weights) with ``TrainResult.pruned`` set. Hyperparameter
    search uses it to prune unpromising trials."""
    if not cfg.data.path:
        raise FmforgeError("data.path is not set: pass --data DATA_DIR (a directory from `fmforge data prepare` "
                           "or `fmforge data prepare-images`)")
    cfg = with_absolute_paths(cfg)
    start = start_for(cfg)
    cfg = start.run_config(cfg)
    info = init_distributed(cfg.train.device, cfg.parallel.timeout_minutes)
    try:
        return _train(cfg, resume, echo if info.is_main else _silent, info, start, on_validation)
    finally:
        unlock_run_dir(cfg.train.out_dir)
        shutdown()


def _silent(*_args) -> None:
    pass


def _train(cfg: Config, resume: str | None, echo, info: DistInfo, start: FromScratch,
           on_validation=None) -> TrainResult:
    # Rank 0 alone inspects (and may tidy) the run directory; every rank gets its verdict.
    run_dir, resume_from = run_on_main(info, lambda: prepare_run_dir(cfg, resume, echo))
    data_dir = Path(cfg.data.path)
    if is_remote(cfg.data.path):  # a local copy, cached per node (ranks of one node share it under a lock)
        data_dir = stage_prepared_data(cfg.data.path)
        echo(f"data: {cfg.data.path} staged in {data_dir}")
    task = make_task(cfg, data_dir, echo)
    cfg = task.resolved_config()  # the model (vocabulary, classes ...) and global batch resolved against the data
    start.check_data(data_dir)
    layout = build_layout(cfg.parallel, cfg.model, info)
    # Ranks of one tensor-parallel group share a data-parallel rank, hence the same rows of each batch.
    micro_batch = micro_batch_hint(run_dir, cfg.train.micro_batch_size, echo)
    loader = Prefetcher(task.make_loader(micro_batch, layout.dp_rank, layout.dp_size),
                        depth=cfg.data.prefetch, pin_memory=info.device.type == "cuda")
    run = _Run(cfg, task, loader, info, layout, run_dir, echo)
    run.build(start, resume_from)
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
    run.announce()
    with StopFlag() as stop, contextlib.closing(loader):
        run.model.train()
        while run.step < cfg.train.max_steps and not any_rank(stop.signal is not None, info):
            if not run.train_step():
                continue  # out of memory (retried smaller) or a loss spike (rolled back)
            t_pause = time.perf_counter()  # validation and checkpoints do not count against throughput
            if run.due(cfg.train.eval_interval) and run.step < cfg.train.max_steps and run.validate() is not None:
                prune = info.is_main and on_validation is not None and bool(on_validation(run.step, run.val_loss))
                if any_rank(prune, info):
                    run.close()
                    echo(f"stopped at step {run.step} (val loss {run.val_loss:.4f}): pruned")
                    return run.result(pruned=True)
            if run.due(cfg.checkpoint.interval):
                run.save()
            run.t_last += time.perf_counter() - t_pause

        # Still under the signal handler: a SIGTERM from here on is absorbed, the run finishes its last writes.
        # Step 0 has nothing to save (and an optimizer without state cannot be checkpointed faithfully).
        if run.saved_at != run.step and run.step > 0:
            run.save()
        if run.step < cfg.train.max_steps:
            run.close()
            name = signal.Signals(stop.signal).name if stop.signal else "a signal on another rank"
            echo(f"{name}: checkpoint written at step {run.step}; continue with --resume auto" if run.step else
                 f"{name}: stopped before the first step; nothing to checkpoint")
            return run.result(preempted=True)
        run.validate()
        run.close()
        full = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        full = start.final_weights(full, run_dir, info.is_main)
        run_on_main(info, lambda: task.save_pretrained(full, run_dir))
        result = run.result()
    losses = "".join(f", {name} {value:.4f}" for name, value in (("train loss", run.loss), ("val loss", run.val_loss))
                     if value is not None)
    echo(f"done: {run.step} steps{losses}; weights in {run_dir / 'model.safetensors'}")
    return result


class _Run:
    """One run's live state (model, optimizer, loader, counters) and the steps the loop above takes with it."""

    def __init__(self, cfg: Config, task: Task, loader: Prefetcher, info: DistInfo, layout: Layout, run_dir: Path,
                 echo):
        self.cfg, self.task, self.loader, self.info, self.layout = cfg, task, loader, info, layout
        self.run_dir, self.echo, self.device = run_dir, echo, info.device
        self.ckpt_root, remote = checkpoint_places(cfg, run_dir)
        self.uploader = mirror.Uploader(remote if info.is_main else None, cfg.checkpoint.keep_last, echo)
        self.step, self.saved_at = 0, -1
        self.loss = self.val_loss = None
        self.skipped = self.rollbacks = 0
        t = cfg.train
        self.spikes = SpikeDetector(t.spike_threshold, t.spike_warmup) if t.spike_threshold else None
        self.memory = None
        self.peak_reported = False
        self.logger = None

    def build(self, start: FromScratch, resume_from: Path | None) -> None:
        """Model (built on the meta device, adapted, sharded, materialized, started), optimizer, scheduler;
        then the checkpoint's state when resuming."""
        cfg, t, info, device = self.cfg, self.cfg.train, self.info, self.device
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
        # FSDP casts parameters itself (MixedPrecisionPolicy); everywhere else bf16 means autocast.
        self.amp = contextlib.nullcontext if uses_fsdp(cfg.parallel, self.layout) else autocast_for(device, t.precision)
        if t.threads:
            torch.set_num_threads(t.threads)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.cuda.reset_peak_memory_stats(device)
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
        # Built on the meta device (no memory), sharded, then materialized shard by shard. The init draws every
        # weight whole from the CPU generator seeded above, so 1 process and N processes start equal.
        with torch.device("meta"):
            model = self.task.build_model()
            adapted = start.adapt(model)
        if adapted:
            self.echo(adapted)
        self.n_params = model.num_params()
        self.flops_per_unit = self.task.flops_per_unit(model)  # per token (text) or per sample (images)
        preflight(info, self.run_dir, checkpoint_bytes=int(self.n_params * 4 * 3 * 1.1))  # weights + AdamW, fp32
        if is_decoder(cfg.model):  # the activation model is the decoder's (Korthikanti et al.)
            self.memory = estimate_memory(cfg.model, self.n_params, cfg.data.seq_len, self.loader.micro_batch,
                                          info.world_size, cfg.parallel.dp, cfg.parallel.ac, self.bf16, tp=self.layout.tp)
            self.echo(describe(self.memory))
        parallelize(model, cfg.parallel, self.layout, t.compile, self.bf16)
        materialize(model, device)
        if resume_from is None:  # a checkpoint already holds the starting weights
            start.load(model)
        self.model, self.fwd_model = model, wrap_ddp(model, cfg.parallel, self.layout, info)
        self.optimizer = build_optimizer(model, cfg.optim, device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.max_steps)
        if resume_from is not None:
            state, meta = ckpt.load_checkpoint(resume_from, model, self.optimizer, info, verified=True)
            if meta["config"]["model"] != config_to_dict(cfg.model):
                raise FmforgeError(f"checkpoint {resume_from} was trained with a different model config")
            self.scheduler.load_state_dict(state["scheduler"])
            self.loader.load_state_dict(state["loader"])
            self.step = self.saved_at = int(state["step"])
            self.echo(f"resumed from {resume_from} at step {self.step} (saved by {meta.get('world_size', 1)} "
                      f"process(es), now {info.world_size})")

    def announce(self) -> None:
        """The start-up banner, and the metrics logger (main rank)."""
        cfg, layout, info = self.cfg, self.layout, self.info
        self.peak = device_peak_tflops(self.device, cfg.train.peak_tflops)
        mode = "1 process"
        if info.distributed:
            parts = [f"{cfg.parallel.dp} x {layout.dp_size}"] if layout.dp_size > 1 else []
            mode = ", ".join(parts + ([f"tp {layout.tp}"] if layout.tp > 1 else []))
        self.echo(f"model: {cfg.model.arch}, {self.n_params / 1e6:.2f}M parameters | device {self.device}, {mode} | "
                  f"{self.task.batch_description(self.loader, layout.dp_size)} | {cfg.train.max_steps} steps | "
                  f"run dir {self.run_dir}")
        if info.is_main:
            self.logger = MetricsLogger(self.run_dir, cfg.train.max_steps, self.step, cfg.log.tensorboard,
                                        cfg.log.progress, echo=self.echo)
        self._reset_timers()

    def _reset_timers(self) -> None:
        self.t_last, self.units_since, self.data_wait, self.steps_since = time.perf_counter(), 0, 0.0, 0

    def due(self, interval: int) -> bool:
        return bool(interval) and self.step % interval == 0

    def train_step(self) -> bool:
        """One optimizer step over this rank's micro-batches. False when the step was not taken: out of
        memory (the micro-batch is halved and the step retried) or a loss spike (rolled back)."""
        loader, optimizer = self.loader, self.optimizer
        lr = self.scheduler.get_last_lr()[0]
        loss_sum = torch.zeros((), device=self.device)
        t_data = time.perf_counter()
        position = loader.state_dict()  # before this step's batch: where an out-of-memory retry restarts
        micro_batches = loader.next_step()
        self.data_wait += time.perf_counter() - t_data
        out_of_memory = False
        try:
            for i, batch in enumerate(micro_batches):
                with _grad_sync(self.fwd_model, self.info, last=i == len(micro_batches) - 1):
                    micro_loss = self.task.loss(self.fwd_model, batch, self.device, self.amp)
                    (micro_loss / len(micro_batches)).backward()
                loss_sum += micro_loss.detach()
        except torch.OutOfMemoryError:
            out_of_memory = True  # handled outside the except block, once its traceback has freed the tensors
        if out_of_memory:
            micro_batches = batch = micro_loss = None
            optimizer.zero_grad(set_to_none=True)
            halve_micro_batch(loader, position, self.run_dir, self.step + 1, self.info, self.echo)
            return False
        step_loss = loss_sum / len(micro_batches)
        if self.spikes is not None and self._spiked(mean_across_ranks(step_loss, self.info).item()):
            return False
        grad_norm = clip_grad_norm(self.model.parameters(), self.cfg.optim.grad_clip or math.inf)
        # The norm is global (gradients are already reduced), so every rank makes the same call.
        if torch.isfinite(grad_norm):
            optimizer.step()
            self.task.after_step(self.model, self.step + 1)
        else:
            self.skipped += 1
            self.echo(f"warning: step {self.step + 1}: non-finite loss or gradient; update skipped "
                      f"({self.skipped} so far)")
        self.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.steps_since += 1
        self.units_since += self.task.global_batch
        if self.due(self.cfg.train.log_interval) or self.step == self.cfg.train.max_steps:
            self._log_step(step_loss, lr, grad_norm)
        elif self.logger is not None:
            self.logger.advance(self.step)
        return True

    def _spiked(self, step_loss: float) -> bool:
        """Judge the step's loss (the same on every rank); on a spike, roll back to the last checkpoint and
        skip the offending batches."""
        if not self.spikes.is_spike(step_loss):
            return False
        if self.saved_at <= 0:
            self.echo(f"warning: loss spike at step {self.step + 1} ({step_loss:.4f}) but no checkpoint yet to roll "
                      "back to; continuing")
            return False
        self.rollbacks += 1
        self.echo(f"warning: loss spike at step {self.step + 1} ({step_loss:.4f}, running mean "
                  f"{self.spikes.mean:.4f}): rolling back to step {self.saved_at} and skipping batches "
                  f"{self.saved_at + 1}..{self.step + 1} ({self.rollbacks} rollback(s) so far)")
        self.optimizer.zero_grad(set_to_none=True)
        position = self.loader.state_dict()  # already past the offending batches: keep it
        state, _ = ckpt.load_checkpoint(ckpt.step_dir(self.ckpt_root, self.saved_at), self.model, self.optimizer,
                                        self.info)
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(position)
        self.step = int(state["step"])
        if self.logger is not None:
            self.logger.rewind(self.step)
        self._reset_timers()
        return True

    def _log_step(self, step_loss: torch.Tensor, lr: float, grad_norm: torch.Tensor) -> None:
        info, unit, units = self.info, self.task.unit, self.task.global_batch
        self.loss = mean_across_ranks(step_loss, info).item()
        dt = time.perf_counter() - self.t_last
        record = {"step": self.step, "loss": self.loss, "lr": lr, "grad_norm": grad_norm.item(),
                  f"{unit}_per_s": self.units_since / dt, unit: self.step * units}
        if self.peak:
            record["mfu"] = self.flops_per_unit * record[f"{unit}_per_s"] / (self.peak * 1e12 * info.world_size)
        record["peak_mem_gb"] = peak_memory_gb(self.device)
        record["data_wait_frac"] = self.data_wait / dt  # share of wall time spent waiting for batches
        step_times = gather_floats(dt / self.steps_since, info)
        if info.distributed:
            record["step_time_max"], record["step_time_min"] = max(step_times), min(step_times)
            median = sorted(step_times)[len(step_times) // 2]
            slow = [r for r, s in enumerate(step_times) if s > 1.2 * median]
            if slow:
                self.echo(f"warning: straggler rank(s) {slow}: {max(step_times):.3f} s/step vs median {median:.3f}")
        if not self.peak_reported:
            self.peak_reported = True
            what = "GPU memory" if self.device.type == "cuda" else "process RSS, libraries included"
            estimate = f"; estimated {self.memory['total']:.3g} GB" if self.memory else ""
            self.echo(f"measured peak after {self.step} steps: {record['peak_mem_gb']:.2f} GB ({what}){estimate}")
        if self.loader.micro_batch != self.cfg.train.micro_batch_size:
            record["micro_batch_size"] = self.loader.micro_batch
        if self.skipped:
            record["skipped_steps"] = self.skipped
        if self.rollbacks:
            record["rollbacks"] = self.rollbacks
        self._log(record)
        self._reset_timers()

    def _log(self, record: dict) -> None:
        if self.logger is not None:
            self.logger.log(record)

    def validate(self) -> float | None:
        """Validation metrics logged at this step; the model back in training mode."""
        metrics = self.task.validate(self.fwd_model, self.loader.micro_batch, self.device, self.amp)
        self.model.train()
        if metrics is None:
            return None
        self._log({"step": self.step, **metrics})
        self.val_loss = metrics["val_loss"]
        return self.val_loss

    def save(self) -> Path:
        self.uploader.wait()  # local pruning must not remove a checkpoint still being uploaded
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict()}
        path = ckpt.save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, state,
                                    config_to_dict(self.cfg), self.cfg.checkpoint.keep_last, self.info)
        self.uploader.start(path)
        self.saved_at = self.step
        return path

    def close(self) -> None:
        """Wait for the upload in flight and close the metrics logger."""
        self.uploader.wait()
        if self.logger is not None:
            self.logger.close()

    def result(self, preempted: bool = False, pruned: bool = False) -> TrainResult:
        barrier(self.info)  # leave together: a rank tearing down gloo while another still talks to it aborts
        return TrainResult(self.run_dir, self.step, self.loss, self.val_loss, preempted=preempted, pruned=pruned)


def _grad_sync(fwd_model, info: DistInfo, last: bool):
    """DDP: all-reduce gradients only on a step's last micro-batch. FSDP2 reduce-scatters every micro-batch
    (torchtitan's default): skipping it would keep full unsharded fp32 gradients on every rank."""
    if info.distributed and not last and hasattr(fwd_model, "no_sync"):
        return fwd_model.no_sync()
    return contextlib.nullcontext()
