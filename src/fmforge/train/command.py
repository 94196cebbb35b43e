"""What ``fmforge train``, ``finetune`` and ``export safetensors`` add to the library calls: validate the
config before anything starts, become torchrun when asked for several processes or restarts, say what was
written."""

from __future__ import annotations

import os
import sys

from fmforge.config import load_config
from fmforge.errors import FmforgeError
from fmforge.train.checkpoint import export_consolidated
from fmforge.train.loop import train


def train_command(config: str, overrides: list[str], *, data: str | None = None, out: str | None = None,
                  resume: str | None = None, nproc_per_node: int = 1, max_restarts: int = 0) -> None:
    """``fmforge train``: validate the config, become torchrun when asked for several processes or
    restarts, then run the one training loop (whatever the model family and objective)."""
    cfg = load_config(config, overrides)  # a bad config fails here, before any process starts
    if (nproc_per_node > 1 or max_restarts > 0) and "LOCAL_RANK" not in os.environ:
        _torchrun(config, overrides, data=data, out=out, resume=resume, nproc_per_node=nproc_per_node,
                  max_restarts=max_restarts)
    # Paths are set as plain strings, not as overrides: YAML would read `run #2` as `run` and 2024 as an int.
    if data:
        cfg.data.path = data
    if out:
        cfg.train.out_dir = out
    train(cfg, resume=resume)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every file is written and the process group destroyed by now. Skipping interpreter teardown
        # avoids a race in gloo's background threads that aborts ~1 exit in 5 on CPU ("terminate called
        # without an active exception"), which torchrun would report as a failed run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _torchrun(config: str, overrides: list[str], *, data: str | None, out: str | None, resume: str | None,
              nproc_per_node: int, max_restarts: int) -> None:
    """Re-run this same `fmforge train` under torchrun on this machine. A restarted worker group must pick
    up where the failed one stopped, so --max-restarts implies --resume auto."""
    if nproc_per_node < 1:
        raise FmforgeError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    resume = resume or ("auto" if max_restarts > 0 else None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
           f"--max-restarts={max_restarts}", "-m", "fmforge", "train", config, *overrides]
    for flag, value in (("--data", data), ("--out", out), ("--resume", resume)):
        if value:
            cmd += [flag, value]
    # Become torchrun (same PID): signals from a scheduler or Ctrl-C reach it and, through it, the workers.
    sys.stdout.flush()
    os.execv(sys.executable, cmd)


def finetune_command(config: str, overrides: list[str], *, base: str | None = None, data: str | None = None,
                     out: str | None = None, resume: str | None = None, nproc_per_node: int = 1,
                     max_restarts: int = 0) -> None:
    """``fmforge finetune``: ``fmforge train`` that insists on a base model (``base`` sets finetune.base)."""
    if base:
        overrides = [*overrides, f"finetune.base={base}"]
    if not load_config(config, overrides).finetune.base:
        raise FmforgeError("fmforge finetune needs a base model: --base RUN_DIR (or finetune.base in the config)")
    train_command(config, overrides, data=data, out=out, resume=resume, nproc_per_node=nproc_per_node,
                  max_restarts=max_restarts)


def export_safetensors_command(checkpoint: str, out: str, overwrite: bool = False) -> None:
    """``fmforge export safetensors``: consolidate a sharded checkpoint and say what was written."""
    written = export_consolidated(checkpoint, out, overwrite=overwrite)
    print(f"wrote {written / 'model.safetensors'} (+ model.json, tokenizer)")
