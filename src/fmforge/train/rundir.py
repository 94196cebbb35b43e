"""The run directory (``train.out_dir``): where checkpoints live, and what ``--resume`` means for it, decided
once by rank 0 before any work: a fresh run refuses a directory that already holds one; ``auto`` takes the
newest valid checkpoint, local or mirrored; an explicit path or URL is fetched and verified. Resuming from an
older step moves the newer checkpoints aside instead of deleting them.

Rank 0 holds an exclusive lock on ``RUN_DIR/.fmforge.lock`` for the whole run, so two processes never train
into one run directory (a double submit, a rescheduled pod whose predecessor still runs) and prune each
other's checkpoints; a ``config.yaml`` that fmforge did not write is never overwritten."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from fmforge.config import Config
from fmforge.errors import FmforgeError
from fmforge.io.fs import is_remote
from fmforge.train import checkpoint as ckpt
from fmforge.train import mirror


def with_absolute_paths(cfg: Config) -> Config:
    """The config with local data, checkpoint and base paths made absolute (config.yaml must work from any
    directory). A new object; the caller's config is left as it was."""
    data, checkpoint, finetune = cfg.data, cfg.checkpoint, cfg.finetune
    if data.path and not is_remote(data.path):
        data = data.model_copy(update={"path": str(Path(data.path).resolve())})
    if checkpoint.dir and not is_remote(checkpoint.dir):
        checkpoint = checkpoint.model_copy(update={"dir": str(Path(checkpoint.dir).resolve())})
    if finetune.base:
        finetune = finetune.model_copy(update={"base": str(Path(finetune.base).resolve())})
    return cfg.model_copy(update={"data": data, "checkpoint": checkpoint, "finetune": finetune})


def checkpoint_places(cfg: Config, run_dir: Path) -> tuple[Path, str | None]:
    """(local checkpoint directory, object-store mirror URL or None)."""
    where = cfg.checkpoint.dir
    if where and not is_remote(where):
        return Path(where), None
    return run_dir / "checkpoints", where


LOCK = ".fmforge.lock"
_held: dict[Path, int] = {}  # run directory -> the open, flock-ed lock file


def lock_run_dir(run_dir: Path) -> None:
    """Take the run directory's exclusive lock for this process (released by ``unlock_run_dir`` or exit)."""
    key = run_dir.resolve()
    if key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise FmforgeError(f"{run_dir} is in use by {holder}: wait for it to finish, or use another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[key] = fd


def unlock_run_dir(run_dir: str | Path | None) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None) if run_dir else None
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


def _foreign_config(run_dir: Path) -> bool:
    """A config.yaml in a directory with no sign of an fmforge run (lock, metrics, checkpoints)."""
    marks = (LOCK, "metrics.jsonl", "checkpoints", "model.safetensors")
    return (run_dir / "config.yaml").exists() and not any((run_dir / m).exists() for m in marks)


def prepare_run_dir(cfg: Config, resume: str | None, echo) -> tuple[Path, Path | None]:
    if not cfg.train.out_dir:
        raise FmforgeError("train.out_dir is not set: pass --out RUN_DIR")
    run_dir = Path(cfg.train.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FmforgeError(f"--out {run_dir} exists and is not a directory")
    if _foreign_config(run_dir):
        raise FmforgeError(f"{run_dir / 'config.yaml'} was not written by an fmforge run and would be overwritten: "
                           "use another --out")
    lock_run_dir(run_dir)
    ckpt_root, remote = checkpoint_places(cfg, run_dir)
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
