"""The training loop: read it top to bottom. Objectives plug in as Tasks (``objectives/``: causal LM, masked
LM, image classification, MAE, CLIP/SigLIP, SFT, DPO, text classification): the data, model, micro-batch
loss and validation metrics.

A run is fully described by its resolved config; everything it makes goes into ``train.out_dir``:
``config.yaml``, ``metrics.jsonl``, ``tb/``, ``checkpoints/step_NNNNNNN/`` and, at the end,
``model.safetensors`` + ``model.json`` + ``tokenizer.json``. SIGTERM/SIGINT write a checkpoint and return
cleanly; ``resume="auto"`` continues bit-for-bit where the newest valid checkpoint left off.
"""

from __future__ import annotations

import contextlib
import json
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
from fmforge.errors import FmforgeError
from fmforge.finetune import base as finetune
from fmforge.io.fs import is_remote
from fmforge.models.registry import is_decoder
from fmforge.objectives import make_task
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
from fmforge.train.parallel import build_layout, clip_grad_norm, materialize, parallelize, uses_fsdp, wrap_ddp


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float | None
    val_loss: float | None
    preempted: bool
    pruned: bool = False  # stopped early because ``on_validation`` asked to (hyperparameter search)


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast (weights and optimizer stay fp32) or plain fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class _StopFlag:
    """SIGTERM/SIGINT → finish the current step, checkpoint, return. A second SIGINT aborts at once."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave handlers alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, sig, frame):
        if self.signal is not None and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = sig

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _checkpoint_places(cfg: Config, run_dir: Path) -> tuple[Path, str | None]:
    """(local checkpoint directory, object-store mirror URL or None)."""
    where = cfg.checkpoint.dir
    if where and not is_remote(where):
        return Path(where), None
    return run_dir / "checkpoints", where


def _prepare_run_dir(cfg: Config, resume: str | None, echo) -> tuple[Path, Path | None]:
    if not cfg.train.out_dir:
        raise FmforgeError("train.out_dir is not set: pass --out RUN_DIR")
    run_dir = Path(cfg.train.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FmforgeError(f"--out {run_dir} exists and is not a directory")
    ckpt_root, remote = _checkpoint_places(cfg, run_dir)
    if resume is None:
        if ckpt.list_checkpoints(ckpt_root) or (run_dir / "model.safetensors").exists():
            raise FmforgeError(f"{run_dir} already holds a run: pass --resume auto to continue it, or another --out")
        if remote and mirror.list_remote_checkpoints(remote):
            raise FmforgeError(f"{remote} already holds checkpoints: pass --resume auto to continue that run, or "
                               "set another checkpoint.dir")
        return run_dir, None
    if resume == "auto":
        path = ckpt.latest_valid_checkpoint(ckpt_root, warn=echo)
        if remote:  # the mirror may be ahead (a new machine, a lost local disk): take the newest
            local_step = int(path.name[len(ckpt.PREFIX):]) if path else -1
            names = mirror.list_remote_checkpoints(remote)
            if names and int(names[-1][len(ckpt.PREFIX):]) > local_step:
                fetched = mirror.latest_remote_checkpoint(remote, ckpt_root, warn=echo)
                if fetched is not None and int(fetched.name[len(ckpt.PREFIX):]) > local_step:
                    echo(f"fetched {fetched.name} from {remote}")
                    path = fetched
        if path is None:
            echo(f"no valid checkpoint in {ckpt_root}{f' or {remote}' if remote else ''}: starting from step 0")
            return run_dir, None
    elif is_remote(resume):
        root, _, name = resume.rstrip("/").rpartition("/")
        path = mirror.fetch_checkpoint(root, name, ckpt_root)
    else:
        path = Path(resume)
        if not path.is_dir():
            raise FmforgeError(f"checkpoint not found: {path}")
    step = int(ckpt.verify_checkpoint(path)["step"])
    if path.parent.resolve() == ckpt_root.resolve():
        ckpt.set_aside_newer(ckpt_root, step, warn=echo)
        if remote:
            mirror.set_aside_newer_remote(remote, step, time.strftime("%Y%m%d-%H%M%S"), warn=echo)
    return run_dir, path


def train(cfg: Config, resume: str | None = None, echo=print,
          on_validation: Callable[[int, float], bool] | None = None) -> TrainResult:
    """Pretrain the model described by ``cfg`` with the objective its ``model.arch`` implies (see
    ``objectives/``). ``resume``: None, "auto" or a checkpoint directory.

    Run it as one process, or under torchrun for data parallelism (DDP / FSDP2 / HSDP per
    ``parallel.dp``): every rank runs this same function on its slice of each global batch.

    ``on_validation(step, val_loss)`` is called on the main rank after each periodic validation; returning
    True ends the run there (no checkpoint, no final weights) with ``TrainResult.pruned`` set. Hyperparameter
    search uses it to prune unpromising trials."""
    if not cfg.data.path:
        raise FmforgeError("data.path is not set: pass --data DATA_DIR (a directory from `fmforge data prepare` "
                           "or `fmforge data prepare-images`)")
    # config.yaml must work from any directory
    if not is_remote(cfg.data.path):
        cfg.data.path = str(Path(cfg.data.path).resolve())
    if cfg.checkpoint.dir and not is_remote(cfg.checkpoint.dir):
        cfg.checkpoint.dir = str(Path(cfg.checkpoint.dir).resolve())
    if cfg.finetune.base:
        cfg.finetune.base = str(Path(cfg.finetune.base).resolve())
        cfg.model = finetune.base_model_config(cfg)
    elif cfg.finetune.method != "full" or cfg.finetune.freeze:
        raise FmforgeError(f"finetune.{'method' if cfg.finetune.method != 'full' else 'freeze'} needs "
                           "finetune.base: the run directory of the model to fine-tune")
    info = init_distributed(cfg.train.device, cfg.parallel.timeout_minutes)
    if not info.is_main:
        echo = _silent
    try:
        return _train(cfg, resume, echo, info, on_validation)
    finally:
        shutdown()


def _silent(*_args) -> None:
    pass


def _train(cfg: Config, resume: str | None, echo, info: DistInfo, on_validation=None) -> TrainResult:
    t, o = cfg.train, cfg.optim
    # Rank 0 alone inspects (and may tidy) the run directory; every rank gets its verdict.
    run_dir, resume_from = run_on_main(info, lambda: _prepare_run_dir(cfg, resume, echo))
    ckpt_root, remote = _checkpoint_places(cfg, run_dir)
    data_dir = Path(cfg.data.path)
    if is_remote(cfg.data.path):  # a local copy, cached per node (ranks of one node share it under a lock)
        data_dir = stage_prepared_data(cfg.data.path)
        echo(f"data: {cfg.data.path} staged in {data_dir}")
    task = make_task(cfg, data_dir, echo)
    cfg = task.resolved_config()  # the model (vocabulary, classes ...) and global batch resolved against the data
    if cfg.finetune.base:
        finetune.check_tokenizer(cfg.finetune, data_dir)
    layout = build_layout(cfg.parallel, cfg.model, info)
    # Ranks of one tensor-parallel group share a data-parallel rank, hence the same rows of each batch.
    micro_batch = _micro_batch_hint(run_dir, t.micro_batch_size, echo)
    loader = Prefetcher(task.make_loader(micro_batch, layout.dp_rank, layout.dp_size),
                        depth=cfg.data.prefetch, pin_memory=info.device.type == "cuda")

    device = info.device
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    fsdp = uses_fsdp(cfg.parallel, layout)
    # FSDP casts parameters itself (MixedPrecisionPolicy); everywhere else bf16 means autocast.
    amp = contextlib.nullcontext if fsdp else autocast_for(device, t.precision)
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
        model = task.build_model()
        if cfg.finetune.base:
            echo(f"fine-tuning {cfg.finetune.base}: {finetune.adapt(model, cfg.finetune)}")
    n_params = model.num_params()
    flops_per_unit = task.flops_per_unit(model)  # per token (text) or per sample (images)
    preflight(info, run_dir, checkpoint_bytes=int(n_params * 4 * 3 * 1.1))  # weights + AdamW moments, fp32
    memory = None
    if is_decoder(cfg.model):  # the activation model is the decoder's (Korthikanti et al.)
        memory = estimate_memory(cfg.model, n_params, cfg.data.seq_len, micro_batch, info.world_size,
                                 cfg.parallel.dp, cfg.parallel.ac, bf16, tp=layout.tp)
        echo(describe(memory))
    parallelize(model, cfg.parallel, layout, t.compile, bf16)
    materialize(model, device)
    if cfg.finetune.base and resume_from is None:  # a checkpoint already holds the fine-tuned weights
        finetune.load_base(model, cfg.finetune)
    fwd_model = wrap_ddp(model, cfg.parallel, layout, info)
    optimizer = build_optimizer(model, o, device)
    scheduler = build_scheduler(optimizer, o, t.max_steps)
    step = 0
    if resume_from is not None:
        state, meta = ckpt.load_checkpoint(resume_from, model, optimizer, info, verified=True)
        if meta["config"]["model"] != config_to_dict(cfg.model):
            raise FmforgeError(f"checkpoint {resume_from} was trained with a different model config")
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        step = int(state["step"])
        echo(f"resumed from {resume_from} at step {step} (saved by {meta.get('world_size', 1)} process(es), "
             f"now {info.world_size})")

    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
    peak = device_peak_tflops(device, t.peak_tflops)
    mode = "1 process"
    if info.distributed:
        parts = [f"{cfg.parallel.dp} x {layout.dp_size}"] if layout.dp_size > 1 else []
        mode = ", ".join(parts + ([f"tp {layout.tp}"] if layout.tp > 1 else []))
    echo(f"model: {cfg.model.arch}, {n_params / 1e6:.2f}M parameters | device {device}, {mode} | "
         f"{task.batch_description(loader, layout.dp_size)} | {t.max_steps} steps | run dir {run_dir}")
    logger = None
    if info.is_main:
        logger = MetricsLogger(run_dir, t.max_steps, step, cfg.log.tensorboard, cfg.log.progress, echo=echo)

    def log(record: dict) -> None:
        if logger is not None:
            logger.log(record)

    uploader = mirror.Uploader(remote if info.is_main else None, cfg.checkpoint.keep_last, echo)

    def save(at_step: int) -> Path:
        uploader.wait()  # local pruning must not remove a checkpoint still being uploaded
        state = {"step": at_step, "scheduler": scheduler.state_dict(), "loader": loader.state_dict()}
        path = ckpt.save_checkpoint(ckpt_root, at_step, model, optimizer, state, config_to_dict(cfg),
                                    cfg.checkpoint.keep_last, info)
        uploader.start(path)
        return path

    def validate() -> float | None:
        metrics = task.validate(fwd_model, loader.micro_batch, device, amp)
        if metrics is None:
            return None
        log({"step": step, **metrics})
        return metrics["val_loss"]

    loss = val_loss = None
    skipped = rollbacks = 0
    spikes = SpikeDetector(t.spike_threshold, t.spike_warmup) if t.spike_threshold else None
    saved_at = step if resume_from is not None else -1
    t_last, units_since, data_wait, steps_since = time.perf_counter(), 0, 0.0, 0
    unit = task.unit  # "tokens" or "samples": what the throughput and the running total count
    peak_reported = False
    with _StopFlag() as stop, contextlib.closing(loader):
        model.train()
        while step < t.max_steps and not any_rank(stop.signal is not None, info):
            lr = scheduler.get_last_lr()[0]
            loss_sum = torch.zeros((), device=device)
            t_data = time.perf_counter()
            position = loader.state_dict()  # before this step's batch: where an out-of-memory retry restarts
            micro_batches = loader.next_step()
            data_wait += time.perf_counter() - t_data
            out_of_memory = False
            try:
                for i, batch in enumerate(micro_batches):
                    with _grad_sync(fwd_model, info, last=i == len(micro_batches) - 1):
                        micro_loss = task.loss(fwd_model, batch, device, amp)
                        (micro_loss / len(micro_batches)).backward()
                    loss_sum += micro_loss.detach()
            except torch.OutOfMemoryError:
                out_of_memory = True  # handled outside the except block, once its traceback has freed the tensors
            if out_of_memory:
                micro_batches = batch = micro_loss = None
                optimizer.zero_grad(set_to_none=True)
                _halve_micro_batch(loader, position, run_dir, step + 1, info, echo)
                continue
            if spikes is not None:
                step_loss = mean_across_ranks(loss_sum / len(micro_batches), info).item()  # same on all ranks
                spike = spikes.is_spike(step_loss)
                if spike and saved_at <= 0:
                    echo(f"warning: loss spike at step {step + 1} ({step_loss:.4f}) but no checkpoint yet to "
                         "roll back to; continuing")
                if spike and saved_at > 0:
                    rollbacks += 1
                    echo(f"warning: loss spike at step {step + 1} ({step_loss:.4f}, running mean "
                         f"{spikes.mean:.4f}): rolling back to step {saved_at} and skipping batches "
                         f"{saved_at + 1}..{step + 1} ({rollbacks} rollback(s) so far)")
                    optimizer.zero_grad(set_to_none=True)
                    position = loader.state_dict()  # already past the offending batches: keep it
                    state, _ = ckpt.load_checkpoint(ckpt.step_dir(ckpt_root, saved_at), model, optimizer, info)
                    scheduler.load_state_dict(state["scheduler"])
                    loader.load_state_dict(position)
                    step = int(state["step"])
                    if logger is not None:
                        logger.rewind(step)
                    t_last, units_since, data_wait, steps_since = time.perf_counter(), 0, 0.0, 0
                    continue
            grad_norm = clip_grad_norm(model.parameters(), o.grad_clip or math.inf)
            # The norm is global (gradients are already reduced), so every rank makes the same call.
            if torch.isfinite(grad_norm):
                optimizer.step()
            else:
                skipped += 1
                echo(f"warning: step {step + 1}: non-finite loss or gradient; update skipped ({skipped} so far)")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_since += 1
            units_since += task.units_per_step

            if step % t.log_interval == 0 or step == t.max_steps:
                loss = mean_across_ranks(loss_sum / len(micro_batches), info).item()
                dt = time.perf_counter() - t_last
                record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
                          f"{unit}_per_s": units_since / dt, unit: step * task.units_per_step}
                if peak:
                    record["mfu"] = flops_per_unit * record[f"{unit}_per_s"] / (peak * 1e12 * info.world_size)
                record["peak_mem_gb"] = peak_memory_gb(device)
                record["data_wait_frac"] = data_wait / dt  # share of wall time spent waiting for batches
                step_times = gather_floats(dt / steps_since, info)
                if info.distributed:
                    record["step_time_max"], record["step_time_min"] = max(step_times), min(step_times)
                    median = sorted(step_times)[len(step_times) // 2]
                    slow = [r for r, s in enumerate(step_times) if s > 1.2 * median]
                    if slow:
                        echo(f"warning: straggler rank(s) {slow}: {max(step_times):.3f} s/step vs median {median:.3f}")
                if not peak_reported:
                    peak_reported = True
                    what = "GPU memory" if device.type == "cuda" else "process RSS, libraries included"
                    estimate = f"; estimated {memory['total']:.3g} GB" if memory else ""
                    echo(f"measured peak after {step} steps: {record['peak_mem_gb']:.2f} GB ({what}){estimate}")
                if loader.micro_batch != t.micro_batch_size:
                    record["micro_batch_size"] = loader.micro_batch
                if skipped:
                    record["skipped_steps"] = skipped
                if rollbacks:
                    record["rollbacks"] = rollbacks
                log(record)
                t_last, units_since, data_wait, steps_since = time.perf_counter(), 0, 0.0, 0
            elif logger is not None:
                logger.advance(step)
            t_pause = time.perf_counter()  # validation and checkpoints do not count against throughput
            if t.eval_interval and step % t.eval_interval == 0 and step < t.max_steps:
                val_loss = validate()
                if val_loss is not None:
                    prune = info.is_main and on_validation is not None and bool(on_validation(step, val_loss))
                    if any_rank(prune, info):
                        uploader.wait()
                        if logger is not None:
                            logger.close()
                        echo(f"stopped at step {step} (val loss {val_loss:.4f}): pruned")
                        barrier(info)
                        return TrainResult(run_dir, step, loss, val_loss, preempted=False, pruned=True)
                model.train()
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                save(step)
                saved_at = step
            t_last += time.perf_counter() - t_pause

        # Still under the signal handler: a SIGTERM from here on is absorbed, the run finishes its last writes.
        # Step 0 has nothing to save (and an optimizer without state cannot be checkpointed faithfully).
        if saved_at != step and step > 0:
            save(step)
        uploader.wait()
        if step < t.max_steps:
            if logger is not None:
                logger.close()
            name = signal.Signals(stop.signal).name if stop.signal else "a signal on another rank"
            echo(f"{name}: checkpoint written at step {step}; continue with --resume auto" if step else
                 f"{name}: stopped before the first step; nothing to checkpoint")
            barrier(info)
            return TrainResult(run_dir, step, loss, val_loss, preempted=True)
        val_loss = validate()
        if logger is not None:
            logger.close()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        full = finetune.final_weights(full, cfg.finetune, run_dir, info.is_main)
        run_on_main(info, lambda: task.save_pretrained(full, run_dir))
        barrier(info)  # leave together: a rank tearing down gloo while another still talks to it aborts
    losses = "".join(f", {name} {value:.4f}" for name, value in (("train loss", loss), ("val loss", val_loss))
                     if value is not None)
    echo(f"done: {step} steps{losses}; weights in {run_dir / 'model.safetensors'}")
    return TrainResult(run_dir, step, loss, val_loss, preempted=False)


MICRO_BATCH_HINT = "micro_batch_size.json"


def _micro_batch_hint(run_dir: Path, configured: int, echo) -> int:
    """The micro-batch an earlier attempt of this run fell back to after running out of memory, if smaller."""
    path = run_dir / MICRO_BATCH_HINT
    if not path.is_file():
        return configured
    try:
        hint = json.loads(path.read_text())
        size = int(hint["micro_batch_size"])
    except (ValueError, KeyError, TypeError):
        echo(f"warning: ignoring unreadable {path}")
        return configured
    if size >= configured:
        return configured
    echo(f"warning: train.micro_batch_size {configured} -> {size}: this run ran out of memory at step "
         f"{hint.get('step')} before ({path}); the global batch is unchanged")
    return size


def _halve_micro_batch(loader: Prefetcher, position: dict, run_dir: Path, step: int, info: DistInfo, echo) -> None:
    """Out of device memory: halve the micro-batch (doubling accumulation, so the global batch and the
    results are unchanged) and redo the step. One process retries at once. Under torchrun the other ranks
    are already inside a collective this rank will never join, so this rank records the new size in the run
    directory and fails; the restart (``--max-restarts``, or ``--resume auto``) picks it up."""
    old = loader.micro_batch
    new = old // 2
    per_rank = loader.loader.global_batch // loader.loader.world_size
    if new < 1 or per_rank % new:
        raise FmforgeError(f"out of device memory at step {step} with train.micro_batch_size={old}, and it "
                           "cannot be halved further: use activation checkpointing (parallel.ac), FSDP or a "
                           "smaller model.")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    hint = {"micro_batch_size": new, "step": step, "reason": f"out of memory at micro-batch {old}"}
    tmp = run_dir / f".{MICRO_BATCH_HINT}.{info.rank}"  # every rank may hit this at once: write, then rename
    tmp.write_text(json.dumps(hint) + "\n")
    tmp.replace(run_dir / MICRO_BATCH_HINT)
    if info.distributed:
        raise FmforgeError(f"rank {info.rank}: out of device memory at step {step} with micro-batch {old}; the "
                           f"run restarts with {new} (set in {run_dir / MICRO_BATCH_HINT})")
    loader.set_micro_batch(new)
    loader.load_state_dict(position)
    echo(f"warning: out of device memory at step {step}: micro-batch {old} -> {new}, accumulation "
         f"{per_rank // old} -> {per_rank // new} steps (global batch unchanged); retrying the step")


class SpikeDetector:
    """Running mean and variance of the step loss (exponential, ~100-step memory); a loss more than
    ``threshold`` standard deviations above the mean, after ``warmup`` steps, is a spike. Spikes do not
    update the statistics."""

    def __init__(self, threshold: float, warmup: int, alpha: float = 0.01):
        self.threshold, self.warmup, self.alpha = threshold, warmup, alpha
        self.mean, self.var, self.seen = 0.0, 0.0, 0

    def is_spike(self, loss: float) -> bool:
        if self.seen >= self.warmup and loss > self.mean + self.threshold * math.sqrt(self.var):
            return True
        if self.seen == 0:
            self.mean = loss
        else:
            delta = loss - self.mean
            self.mean += self.alpha * delta
            self.var = (1 - self.alpha) * (self.var + self.alpha * delta * delta)
        self.seen += 1
        return False


def _grad_sync(fwd_model, info: DistInfo, last: bool):
    """DDP: all-reduce gradients only on a step's last micro-batch. FSDP2 reduce-scatters every micro-batch
    (torchtitan's default): skipping it would keep full unsharded fp32 gradients on every rank."""
    if info.distributed and not last and hasattr(fwd_model, "no_sync"):
        return fwd_model.no_sync()
    return contextlib.nullcontext()
