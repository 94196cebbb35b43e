"""Atomic, checksummed training checkpoints: ``RUN_DIR/checkpoints/step_NNNNNNN/``.

A checkpoint directory holds the model and optimizer as torch Distributed Checkpoint shards (``.metadata``,
``__R_0.distcp``), ``train_state.pt`` (scheduler, loader position, step), ``rng_R.pt`` (each rank's RNG
states) and ``meta.json`` (step, world size, config, sha256 of each file). It is written
under a temporary name, every file fsynced, then renamed into place, so a kill at any moment leaves either
the old set of checkpoints or the new one — never a half-written checkpoint that looks valid. ``latest``
names the newest one written; resume still verifies checksums and falls back past a corrupt one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from pydantic import ValidationError
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from fmforge.data.staging import stage_prepared_data
from fmforge.errors import FmforgeError
from fmforge.io.fs import is_remote, sha256_file
from fmforge.io.paths import UnsafePath, relative_name
from fmforge.models.registry import build_model, parse_model_config
from fmforge.runs import save_pretrained
from fmforge.train.distributed import DistInfo, barrier, run_on_main
from fmforge.train.safe_load import CorruptCheckpoint, SafePlanner, SafeReader

FORMAT_VERSION = 2  # 1: single-process safetensors + torch.save (before DCP)
PREFIX = "step_"
META = "meta.json"  # written last: a checkpoint directory without it is not finished
# The temporaries fmforge itself makes beside checkpoints; nothing else in checkpoint.dir is ever removed.
OWN_TEMPORARY = re.compile(r"\.tmp_(old_|fetch_)?step_\d+")
__all__ = ["CorruptCheckpoint"]  # defined with the safe reader, raised from here too


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


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns when no process group exists; one process is a supported world size here, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:07d}"


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict, config: dict, keep_last: int, info: DistInfo) -> Path:
    """Write checkpoint ``step`` on every rank (collective), point ``latest`` at it, prune to ``keep_last``.

    Model and optimizer go through torch Distributed Checkpoint, each rank writing its own shards, so the
    checkpoint loads at any world size and in any data-parallel mode; ``train_state`` (scheduler, loader
    position, step) is global and written by rank 0; RNG states are per rank.
    """
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp_{final.name}"
    run_on_main(info, lambda: _fresh_tmp(root, tmp))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_ok():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_{info.rank}.pt")
    if info.is_main:
        torch.save(train_state, tmp / "train_state.pt")
    barrier(info)
    # Hashing a large checkpoint takes minutes: every rank fsyncs and hashes its share of the files.
    names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    mine = {}
    for name in names[info.rank::info.world_size]:
        _fsync(tmp / name)
        mine[name] = sha256_file(tmp / name)
    shares = [mine]
    if info.distributed:
        shares = [None] * info.world_size
        torch.distributed.all_gather_object(shares, mine)
    files = dict(sorted((k, v) for share in shares for k, v in share.items()))
    run_on_main(info, lambda: _publish(root, tmp, final, step, files, config, keep_last, info.world_size))
    return final


def _fresh_tmp(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.iterdir():  # left by a process killed mid-save: never a valid checkpoint
        if OWN_TEMPORARY.fullmatch(stale.name) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()


def _publish(root: Path, tmp: Path, final: Path, step: int, files: dict, config: dict, keep_last: int,
             world_size: int) -> None:
    """Rank 0: write meta.json, rename the finished directory into place, move ``latest``, prune."""
    meta = {"format_version": FORMAT_VERSION, "step": step, "world_size": world_size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files, "config": config}
    (tmp / META).write_text(json.dumps(meta, indent=2))
    _fsync(tmp / META)
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
    for stale in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)


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
    meta_path = path / META
    if not meta_path.is_file():
        raise CorruptCheckpoint(f"checkpoint {path} has no meta.json")
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
        step = int(meta["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CorruptCheckpoint(f"checkpoint {path} has an unreadable meta.json") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CorruptCheckpoint(f"checkpoint {path} has format version {meta.get('format_version')!r}; this "
                                f"fmforge reads version {FORMAT_VERSION}")
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise CorruptCheckpoint(f"checkpoint {path} has an unreadable meta.json (no file checksums)")
    if path.name.startswith(PREFIX) and path.name != f"{PREFIX}{step:07d}":
        raise CorruptCheckpoint(f"checkpoint {path} says it is step {step}")
    check_names(path, files)
    present = {p.name for p in path.iterdir()} - {META}
    if present - set(files):  # nothing is loaded that meta.json does not vouch for
        raise CorruptCheckpoint(f"checkpoint {path} holds {sorted(present - set(files))[0]!r}, which meta.json "
                                "does not list")
    for name, digest in files.items():
        f = path / name
        if not f.is_file() or f.is_symlink():
            raise CorruptCheckpoint(f"checkpoint {path} is missing {name}")
        if sha256_file(f) != digest:
            raise CorruptCheckpoint(f"checkpoint {path}: {name} fails its checksum")
    return meta


def check_names(path: str | Path, files: dict) -> None:
    """Every file a checkpoint's meta.json lists is a plain name inside the checkpoint directory."""
    for name in files:
        try:
            relative_name(name, f"checkpoint {path}: meta.json")
        except UnsafePath as err:
            raise CorruptCheckpoint(str(err)) from None
        if "/" in name or name == META:
            raise CorruptCheckpoint(f"checkpoint {path}: meta.json lists {name!r}, not a checkpoint file name")


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


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    info: DistInfo, verified: bool = False) -> tuple[dict, dict]:
    """Load model and optimizer state in place (resharded to this world size); restore this rank's RNG
    (rank 0's when the checkpoint had fewer ranks). ``verified``: the checksums were already checked (by
    rank 0 when it chose this checkpoint), so each rank does not hash everything again.
    Returns ``(train_state, meta)``."""
    path = Path(path)
    meta = json.loads((path / META).read_text()) if verified else verify_checkpoint(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        _dcp_load({"model": model_sd, "optim": optim_sd}, path)
    except (Exception, CheckpointException) as err:  # DCP's own type is not an Exception
        raise FmforgeError(f"checkpoint {path} does not fit this model or optimizer (was model.* "
                           f"changed?): {_dcp_reason(err)}") from None
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    rng_file = path / f"rng_{info.rank}.pt"
    set_rng_state(torch.load(rng_file if rng_file.exists() else path / "rng_0.pt", weights_only=True))
    train_state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    return train_state, meta


def _dcp_load(state: dict, path: Path) -> None:
    """``dcp.load`` through the reader and planner that cannot run code from the checkpoint."""
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(path), storage_reader=SafeReader(str(path)), planner=SafePlanner())


def _dcp_reason(err: BaseException) -> str:
    """One line for a DCP failure. DCP wraps each rank's exception (with its traceback) in a
    ``CheckpointException``; a ``CorruptCheckpoint`` from the safe reader is re-raised as itself."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    if isinstance(err, CorruptCheckpoint):
        raise err
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def export_consolidated(path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Turn a sharded checkpoint (any world size, any parallel layout) into one ``model.safetensors`` +
    ``model.json`` + tokenizer in ``out_dir``: the run-directory format ``generate``, ``eval`` and the
    exporters read. One process, on the CPU, no process group; only the model's entries are read. An
    existing ``model.safetensors`` in ``out_dir`` is replaced only with ``overwrite``."""
    path = Path(path)
    if not path.is_dir():
        raise FmforgeError(f"checkpoint not found: {path}")
    existing = [Path(out_dir) / n for n in ("model.safetensors", "model.json") if (Path(out_dir) / n).exists()]
    if existing and not overwrite:
        raise FmforgeError(f"{existing[0]} exists: pass --overwrite to replace it, or choose another --out")
    meta = verify_checkpoint(path)
    try:
        model_cfg = parse_model_config(meta["config"]["model"])
    except (KeyError, TypeError, ValueError, ValidationError) as err:
        raise CorruptCheckpoint(f"checkpoint {path}: meta.json has no usable model config ({err})") from None
    with torch.device("meta"):
        model = build_model(model_cfg)
    model.to_empty(device="cpu")
    state = model.state_dict()
    if getattr(model_cfg, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    try:
        _dcp_load({"model": state}, path)
    except (Exception, CheckpointException) as err:
        raise CorruptCheckpoint(f"checkpoint {path} does not fit its own model config: {_dcp_reason(err)}") from None
    data_dir = meta["config"].get("data", {}).get("path")
    if data_dir:
        if is_remote(data_dir):
            data_dir = stage_prepared_data(data_dir)
    tokenizer_dir = data_dir if data_dir and (Path(data_dir) / "tokenizer.json").is_file() else None
    save_pretrained(state, model_cfg, out_dir, tokenizer_dir)
    return Path(out_dir)
