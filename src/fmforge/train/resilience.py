"""What keeps a long run alive: a stop flag for SIGTERM/SIGINT (checkpoint and return), loss-spike
detection (the loop rolls back to its last checkpoint and skips the offending batches), and out-of-memory
recovery (halve the micro-batch, keep the global batch; under torchrun the hint survives the restart)."""

from __future__ import annotations

import contextlib
import json
import math
import signal
from pathlib import Path

import torch

from fmforge.data.loader import Prefetcher
from fmforge.errors import FmforgeError
from fmforge.train.distributed import DistInfo


class StopFlag:
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


MICRO_BATCH_HINT = "micro_batch_size.json"


def micro_batch_hint(run_dir: Path, configured: int, echo) -> int:
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


def halve_micro_batch(loader: Prefetcher, position: dict, run_dir: Path, step: int, info: DistInfo, echo) -> None:
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
