"""What ``fmforge ladder`` and ``fmforge tune`` share: the base config every run starts from, and one
process per output directory."""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path

from fmforge.config import DEFAULT_GLOBAL_BATCH_TOKENS, config_to_dict, load_config
from fmforge.errors import FmforgeError
from fmforge.io.fs import is_remote


def base_config(config, overrides, data) -> dict:
    """The validated base config as a dict, with an absolute data path (what is stored beside the runs must
    not depend on the working directory) and no run directory (each run gets its own)."""
    cfg = load_config(config, list(overrides))
    if data:
        cfg.data.path = data  # a plain string, as `fmforge train --data` does
    if not cfg.data.path:
        raise FmforgeError("data.path is not set: pass --data DATA_DIR (a directory from `fmforge data prepare`)")
    if not is_remote(cfg.data.path):
        if not Path(cfg.data.path).is_dir():
            raise FmforgeError(f"data directory not found: {cfg.data.path}")
        cfg.data.path = str(Path(cfg.data.path).resolve())
    cfg.train.out_dir = None
    cfg.train.global_batch = cfg.train.global_batch or DEFAULT_GLOBAL_BATCH_TOKENS  # ladders and searches are LMs
    return config_to_dict(cfg)


@contextlib.contextmanager
def exclusive(out: Path, verb: str):
    """Refuse a second ``fmforge VERB`` on the same directory. The OS drops the lock when the process dies,
    however it dies, so a held lock always means a live process."""
    with open(out / f"{verb}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FmforgeError(f"another `fmforge {verb}` is running on {out}") from None
        yield


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: configs compared key by key."""
    flat = {}
    for k, v in d.items():
        flat.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat
