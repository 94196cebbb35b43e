"""Atomic, checksummed training checkpoints: ``RUN_DIR/checkpoints/step_NNNNNNN/``.

A checkpoint directory holds ``model.safetensors`` (weights), ``train_state.pt`` (optimizer, scheduler,
loader position, RNG states, step) and ``meta.json`` (step, config, sha256 of each file). It is written
under a temporary name, every file fsynced, then renamed into place, so a kill at any moment leaves either
the old set of checkpoints or the new one — never a half-written checkpoint that looks valid. ``latest``
names the newest one written; resume still verifies checksums and falls back past a corrupt one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from fmforge.errors import FmforgeError

FORMAT_VERSION = 1
PREFIX = "step_"


class CorruptCheckpoint(FmforgeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:07d}"


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, train_state: dict, config: dict,
                    keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it and prune to the newest ``keep_last``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    for stale in root.glob(".tmp_*"):  # left by a process killed mid-save: never a valid checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp_{final.name}"
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(train_state, tmp / "train_state.pt")
    files = {}
    for name in ("model.safetensors", "train_state.pt"):
        _fsync(tmp / name)
        files[name] = _sha256(tmp / name)
    meta = {"format_version": FORMAT_VERSION, "step": step, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files, "config": config}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    _fsync(tmp / "meta.json")
    _fsync(tmp)
    old = None
    if final.exists():  # re-saving a step: move the old one aside first so the step never goes missing
        old = root / f".tmp_old_{final.name}"
        final.rename(old)
    tmp.rename(final)
    _fsync(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name + "\n")
    pointer.replace(root / "latest")
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under ``root``, oldest first (temporaries excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]))


def verify_checkpoint(path: str | Path) -> dict:
    """Return the checkpoint's meta after checking every file against its checksum."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CorruptCheckpoint(f"checkpoint {path} has no meta.json")
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
        step = int(meta["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CorruptCheckpoint(f"checkpoint {path} has an unreadable meta.json") from None
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise CorruptCheckpoint(f"checkpoint {path} has an unreadable meta.json (no file checksums)")
    if path.name.startswith(PREFIX) and path.name != f"{PREFIX}{step:07d}":
        raise CorruptCheckpoint(f"checkpoint {path} says it is step {step}")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"checkpoint {path} is missing {name}")
        if _sha256(f) != digest:
            raise CorruptCheckpoint(f"checkpoint {path}: {name} fails its checksum")
    return meta


def latest_valid_checkpoint(root: str | Path, warn=print) -> Path | None:
    """The checkpoint ``latest`` names if its checksums hold, else the newest one that holds; corrupt ones
    are skipped with a warning."""
    pointer = Path(root) / "latest"
    named = Path(root) / pointer.read_text().strip() if pointer.is_file() else None
    candidates = list(reversed(list_checkpoints(root)))
    if named is not None and named in candidates:
        candidates.remove(named)
        candidates.insert(0, named)
    for path in candidates:
        try:
            verify_checkpoint(path)
            return path
        except CorruptCheckpoint as err:
            warn(f"warning: {err}; falling back to an older checkpoint")
    return None


def set_aside_newer(root: str | Path, step: int, warn=print) -> None:
    """Resuming from an older checkpoint forks history: move the abandoned future's checkpoints out of the
    way (kept, never deleted) so pruning and ``--resume auto`` only ever see the new line."""
    newer = [p for p in list_checkpoints(root) if int(p.name[len(PREFIX):]) > step]
    if not newer:
        return
    aside = Path(root) / f"abandoned_after_{PREFIX}{step:07d}_{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for p in newer:
        p.rename(aside / p.name)
    warn(f"warning: resuming from step {step}: moved {len(newer)} newer checkpoint(s) to {aside}")


def load_checkpoint(path: str | Path, model: torch.nn.Module, device: torch.device) -> tuple[dict, dict]:
    """Load weights into ``model``; return ``(train_state, meta)`` for the caller to restore the rest."""
    path = Path(path)
    meta = verify_checkpoint(path)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False, device=str(device))
    if missing or unexpected:
        raise FmforgeError(f"checkpoint {path} does not fit this model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}): was model.* changed?")
    train_state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    return train_state, meta
