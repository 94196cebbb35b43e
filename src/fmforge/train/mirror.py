"""Checkpoint mirroring to object storage (``checkpoint.dir: s3://...``): upload each finished checkpoint in
the background, prune the remote copy, and fetch the newest complete one back for ``--resume``.

A remote checkpoint is complete once its ``meta.json`` arrived (uploaded last, deleted first); whatever
comes back down is verified against that meta.json's checksums before use.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from fmforge.errors import FmforgeError
from fmforge.io import fs as remote
from fmforge.train.checkpoint import META, CorruptCheckpoint, check_names, verify_checkpoint

_STEP = re.compile(r"step_(\d+)")  # checkpoint directory names (checkpoint.PREFIX + step), matched whole
LATEST = "latest"


def _step(name: str) -> int | None:
    m = _STEP.fullmatch(name)
    return int(m.group(1)) if m else None


def _scan(fs, remote_root: str) -> dict[str, set[str]]:
    """Checkpoint directory name → the files in it, for everything under ``remote_root`` (one listing)."""
    dirs: dict[str, set[str]] = {}
    for rel in remote.find(fs, remote_root):
        name, _, rest = rel.partition("/")
        if rest and _step(name) is not None:
            dirs.setdefault(name, set()).add(rest)
    return dirs


def _delete_checkpoint(fs, remote_root: str, name: str) -> None:
    url = remote.join(remote_root, name)
    with remote.errors(url, "delete"):
        with contextlib.suppress(FileNotFoundError):  # a half-uploaded one has none
            fs.rm_file(remote.key(fs, remote.join(url, META)))  # first: a half-deleted checkpoint must never look complete
        with contextlib.suppress(FileNotFoundError):
            fs.rm(remote.key(fs, url), recursive=True)


def list_remote_checkpoints(remote_root: str) -> list[str]:
    """Names (``step_NNNNNNN``) of the complete checkpoints under ``remote_root`` — those whose meta.json
    arrived — oldest first. A root with nothing under it has none; a missing bucket is an error."""
    dirs = _scan(remote.filesystem(remote_root), remote_root)
    return sorted((n for n, files in dirs.items() if META in files), key=_step)


def mirror_checkpoint(local_ckpt_dir: str | Path, remote_root: str, keep_last: int) -> str:
    """Copy a finished local checkpoint to ``remote_root/<its name>/``, point ``remote_root/latest`` at it
    and prune the remote to ``keep_last``. Returns the checkpoint's URL.

    meta.json goes last (its presence is what makes a remote checkpoint complete); re-mirroring a step
    first deletes the old remote copy, meta.json first. Pruning counts only checkpoints up to this one:
    newer remote ones (an abandoned line, after resuming from an older step) are left alone. Leftovers of
    an interrupted mirror (no meta.json) older than this one are removed.
    """
    src = Path(local_ckpt_dir)
    if keep_last < 1:
        raise FmforgeError(f"keep_last must be at least 1, got {keep_last}")
    step = _step(src.name)
    if step is None:
        raise FmforgeError(f"{src} is not a checkpoint directory (expected a step_NNNNNNN name)")
    try:
        files = sorted(json.loads((src / META).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CorruptCheckpoint(f"checkpoint {src} is not finished (no readable {META}); not mirroring it") from None
    missing = [f for f in files if not (src / f).is_file()]
    if missing:
        raise CorruptCheckpoint(f"checkpoint {src} is missing {missing[0]}; not mirroring it")
    fs = remote.filesystem(remote_root)
    dest = remote.join(remote_root, src.name)
    if src.name in _scan(fs, remote_root):
        _delete_checkpoint(fs, remote_root, src.name)
    remote.put(fs, src, files, dest)
    remote.put(fs, src, [META], dest)
    with remote.errors(remote_root, "write the latest pointer under"):
        fs.pipe_file(remote.key(fs, remote.join(remote_root, LATEST)), (src.name + "\n").encode())
    dirs = _scan(fs, remote_root)
    complete = sorted((n for n, f in dirs.items() if META in f and _step(n) <= step), key=_step)
    unfinished = [n for n, f in dirs.items() if META not in f and _step(n) < step]
    for name in complete[:-keep_last] + unfinished:
        _delete_checkpoint(fs, remote_root, name)
    return dest


def fetch_checkpoint(remote_root: str, name: str, local_root: str | Path) -> Path:
    """Download remote checkpoint ``name`` to ``local_root/name`` and verify its checksums; returns the path.

    A local copy that already verifies is returned without downloading. The download goes to
    ``local_root/.tmp_fetch_<name>`` and is renamed into place only once verified, so a local checkpoint
    directory is always whole. Raises ``CorruptCheckpoint`` (naming the URL) when verification fails.
    """
    if _step(name) is None:
        raise FmforgeError(f"{name!r} is not a checkpoint name (expected step_NNNNNNN)")
    local_root = Path(local_root)
    final = local_root / name
    if final.is_dir():
        with contextlib.suppress(CorruptCheckpoint):
            verify_checkpoint(final)
            return final
    url = remote.join(remote_root, name)
    tmp = local_root / f".tmp_fetch_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _download_listed(url, tmp)
        try:
            meta = verify_checkpoint(tmp)
            if meta["step"] != _step(name):
                raise CorruptCheckpoint(f"checkpoint {tmp} says it is step {meta['step']}")
        except CorruptCheckpoint as err:
            raise CorruptCheckpoint(str(err).replace(str(tmp), url)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # a local copy that failed verification: the verified download replaces it
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _download_listed(url: str, tmp: Path) -> None:
    """Fetch meta.json, then exactly the files it lists (plain names, checked before any download): a
    remote listing never decides what is written where."""
    fs = remote.filesystem(url)
    tmp.mkdir(parents=True)
    remote.get(fs, url, [META], tmp)
    try:
        files = json.loads((tmp / META).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CorruptCheckpoint(f"checkpoint {url} has an unreadable {META}") from None
    if not isinstance(files, dict) or not files:
        raise CorruptCheckpoint(f"checkpoint {url} has an unreadable {META} (no file checksums)")
    check_names(url, files)
    remote.get(fs, url, sorted(files), tmp)


def latest_remote_checkpoint(remote_root: str, local_root: str | Path,
                             warn: Callable[[str], None] = print) -> Path | None:
    """Fetch and return the checkpoint ``remote_root/latest`` names if it verifies, else the newest complete
    one that does; corrupt ones are skipped with a warning (as ``checkpoint.latest_valid_checkpoint``).
    None when the remote holds no usable checkpoint."""
    candidates = list(reversed(list_remote_checkpoints(remote_root)))
    try:
        named = remote.read_text(remote.join(remote_root, LATEST)).strip()
    except FmforgeError:
        named = None
    if named in candidates:
        candidates.remove(named)
        candidates.insert(0, named)
    for name in candidates:
        try:
            return fetch_checkpoint(remote_root, name, local_root)
        except CorruptCheckpoint as err:
            warn(f"warning: {err}; falling back to an older checkpoint")
    return None


def set_aside_newer_remote(remote_root: str, step: int, stamp: str, warn: Callable[[str], None] = print) -> None:
    """Resuming from an older step forks history: move the remote's newer checkpoints under
    ``remote_root/abandoned_after_step_NNNNNNN_<stamp>/`` (kept, never deleted), so ``--resume auto`` and
    pruning only see the new line. Mirrors ``checkpoint.set_aside_newer`` for the local directory."""
    fs = remote.filesystem(remote_root)
    newer = [n for n in _scan(fs, remote_root) if _step(n) > step]
    if not newer:
        return
    aside = remote.join(remote_root, f"abandoned_after_step_{step:07d}_{stamp}")
    for name in sorted(newer, key=_step):
        src, dst = remote.join(remote_root, name), remote.join(aside, name)
        with remote.errors(src, "move"):
            fs.copy(remote.key(fs, src), remote.key(fs, dst), recursive=True)
        _delete_checkpoint(fs, remote_root, name)
    warn(f"warning: resuming from step {step}: moved {len(newer)} newer remote checkpoint(s) to {aside}")


# ---- prepared data: manifest.json + tokenizer + token shards (see data/prepare.py) ----


class Uploader:
    """Uploads each finished checkpoint to the object store on a background thread (rank 0), so training
    goes on while it copies. The next save, and the end of the run, wait for the upload in flight; a failed
    upload is reported as a warning (the local checkpoint is intact) and retried with the next one."""

    def __init__(self, remote: str | None, keep_last: int, echo):
        self.remote, self.keep_last, self.echo = remote, keep_last, echo
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, path: Path) -> None:
        if not self.remote:
            return
        self.wait()
        def upload():
            try:
                mirror_checkpoint(path, self.remote, self.keep_last)
            except Exception as err:  # noqa: BLE001 - reported by wait()
                self._error = err

        self._thread = threading.Thread(target=upload, name="fmforge-checkpoint-upload")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            self.echo(f"warning: checkpoint upload to {self.remote} failed: {self._error}")
            self._error = None
