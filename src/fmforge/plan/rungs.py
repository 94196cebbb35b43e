"""How the ladder trains a rung: as a run of its own, or as a short cooldown branched off its model size's
warmup-stable-decay trunk (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
Training Durations").

fmforge's WSD schedule (``train/optim.py`` lr_factor) holds the learning rate flat after warmup and decays it
linearly over the last ``optim.decay_fraction`` of ``train.max_steps``: a budget of S steps starts its decay at
d(S) = S - max(1, int(S x decay_fraction)). Up to d(S) that factor equals the constant schedule's (the same
warmup ramp, then 1.0, whatever max_steps is), so a constant-schedule trunk stopped at d(S) and resumed with
``schedule=wsd, max_steps=S`` computes exactly the WSD run of S steps: the checkpoint carries the step, the
optimizer and scheduler state, the loader position and the RNG, and the scheduler recomputes its factor from
the branch's own config every step (the lambda is not saved). The trunk stops at each decay start in turn (a
run of ``max_steps = d(S)``, resumed for the next), so a size costs its largest decay start plus every
budget's cooldown, instead of the sum of its budgets.

Layout: ``OUT/trunks/TAG/`` (one run directory per size) and ``OUT/rungs/NAME/`` (each cooldown). Every piece
resumes after a kill: a cooldown from its own newest checkpoint, else from the trunk's checkpoint at its
decay start; the trunk from its own. A budget added after the trunk passed its decay start (and pruned that
checkpoint) trains from step 0 on its own: the same computation at full price.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

from fmforge.config import build_config
from fmforge.errors import FmforgeError
from fmforge.train import checkpoint as ckpt
from fmforge.train.loop import TrainResult, train

SHAPE_KEYS = ("size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len")


def decay_start(steps: int, decay_fraction: float) -> int:
    """First step of the WSD decay of a ``steps``-step run, as ``train/optim.py`` lr_factor places it."""
    return steps - max(1, int(steps * decay_fraction))


def rung_warmup(base: dict, steps: int) -> int:
    """Warmup of a rung (or of every rung of a trunk) whose shortest run is ``steps``: at most a fifth of it."""
    return min(base["optim"]["warmup_steps"], steps // 5)


def run_config(base: dict, run: dict, run_dir: Path, *, max_steps: int | None = None, schedule: str | None = None,
               first_step: int = 0):
    """The base config with this run's shape, length, warmup, schedule and checkpoint cadence (at least four
    checkpoints between ``first_step`` and the end, so a kill loses at most a quarter of the piece)."""
    raw = copy.deepcopy(base)
    raw["model"] = {**{k: v for k, v in raw["model"].items() if k not in SHAPE_KEYS}, **run["model"]}
    steps = max_steps if max_steps is not None else run["steps"]
    raw["train"]["max_steps"] = steps
    raw["train"]["eval_interval"] = 0  # only the final validation loss is fitted
    raw["optim"]["warmup_steps"] = run.get("warmup", rung_warmup(base, steps))
    if schedule is not None:
        raw["optim"]["schedule"] = schedule
    ckpt_cfg = raw["checkpoint"]
    ckpt_cfg["interval"] = min(ckpt_cfg["interval"] or steps, max(1, math.ceil((steps - first_step) / 4)))
    cfg = build_config(raw)
    cfg.train.out_dir = str(run_dir)
    return cfg


def train_piece(cfg, name: str, kind: str, resume: str = "auto") -> tuple[TrainResult, float]:
    """Train (or resume) one run; a preempted run ends the ladder command (KeyboardInterrupt) after saying so."""

    def echo(message: str) -> None:
        if message.startswith(("warning", "resumed")):
            print(f"{name}: {message}")

    start = time.perf_counter()
    result = train(cfg, resume=resume, echo=echo)
    seconds = time.perf_counter() - start
    if result.preempted:
        print(f"{kind} {name} stopped at step {result.step}; rerun the same command to continue the ladder")
        raise KeyboardInterrupt
    return result, seconds


def _reached(trunk_dir: Path) -> int:
    """The trunk's newest checkpointed step (0 before its first)."""
    steps = [int(p.name[len(ckpt.PREFIX):]) for p in ckpt.list_checkpoints(trunk_dir / "checkpoints")]
    return max(steps, default=0)


def train_branch(base: dict, rung: dict, out: Path) -> tuple[TrainResult, float, float]:
    """Train one rung of a branched ladder: its size's trunk up to the rung's decay start (when not there yet),
    then the cooldown from the trunk's checkpoint there. Returns the cooldown's result, its seconds and the
    trunk's seconds."""
    run_dir = out / "rungs" / rung["name"]
    start = decay_start(rung["steps"], base["optim"]["decay_fraction"])
    cfg = run_config(base, rung, run_dir, schedule="wsd", first_step=start)
    if ckpt.list_checkpoints(run_dir / "checkpoints"):  # a cooldown killed mid-way continues on its own
        return (*train_piece(cfg, rung["name"], "rung"), 0.0)
    trunk_dir = out / "trunks" / rung["trunk"]
    source = ckpt.step_dir(trunk_dir / "checkpoints", start)
    trunk_seconds = 0.0
    if not source.is_dir():
        reached = _reached(trunk_dir)
        if reached > start:
            print(f"{rung['name']}: the trunk {rung['trunk']} is past step {start} and kept no checkpoint there; "
                  f"training this rung from step 0")
            return (*train_piece(run_config(base, rung, run_dir, schedule="wsd"), rung["name"], "rung"), 0.0)
        trunk_cfg = run_config(base, rung, trunk_dir, max_steps=start, schedule="constant", first_step=reached)
        trunk, trunk_seconds = train_piece(trunk_cfg, f"trunk {rung['trunk']}", "trunk")
        if not source.is_dir():
            raise FmforgeError(f"trunk {trunk_dir} ended at step {trunk.step} without a checkpoint at step {start}")
        print(f"trunk {rung['trunk']}: stable phase at step {start} ({trunk_seconds:.1f} s)")
    result, seconds = train_piece(cfg, rung["name"], "rung", resume=str(source))
    return result, seconds, trunk_seconds


def ladder_cost(rungs: list[dict], decay_fraction: float, global_batch: int, flops_per_token: dict) -> dict:
    """Tokens and FLOPs of ``rungs`` trained as separate runs and as branched cooldowns (per size: the largest
    decay start once, plus every cooldown). ``flops_per_token`` maps a trunk tag to its training FLOPs/token."""
    separate = {"steps": 0, "flops": 0.0}
    branched = {"steps": 0, "flops": 0.0}
    for tag in {r["trunk"] for r in rungs}:
        mine = [r for r in rungs if r["trunk"] == tag]
        starts = [decay_start(r["steps"], decay_fraction) for r in mine]
        steps_sep = sum(r["steps"] for r in mine)
        steps_br = max(starts) + sum(r["steps"] - s for r, s in zip(mine, starts))
        for total, steps in ((separate, steps_sep), (branched, steps_br)):
            total["steps"] += steps
            total["flops"] += steps * global_batch * flops_per_token[tag]
    for total in (separate, branched):
        total["tokens"] = total["steps"] * global_batch
    return {"separate": separate, "branched": branched}
