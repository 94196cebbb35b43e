"""Object storage (``s3://``, or any other fsspec URL) for checkpoints and prepared data.

Everything fmforge makes is written to local disk first, atomically; this module copies finished artifacts
to and from object storage. S3 has no atomic rename, so an artifact says it is complete with one file that
is uploaded last — ``meta.json`` for a checkpoint, ``manifest.json`` for prepared data — and deleted first
when the artifact is replaced or pruned: a half-uploaded or half-deleted artifact never looks complete.
Whatever comes back down is verified (checkpoint checksums, shard headers, tokenizer hash) before use.

Endpoint and credentials are the standard AWS settings, which botocore reads itself: ``AWS_ENDPOINT_URL``
or ``AWS_ENDPOINT_URL_S3`` (MinIO, SeaweedFS, R2 ...), ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, instance roles; ``AWS_MAX_ATTEMPTS`` bounds retries. s3fs is imported only when an s3://
URL is used (``pip install 'fmforge[s3]'``). Backend failures become one-line ``FmforgeError``s naming the URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from fmforge.errors import FmforgeError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_STEP = re.compile(r"^step_(\d+)$")  # checkpoint directory names (checkpoint.PREFIX + step)
META = "meta.json"  # a checkpoint's completion marker (written last by checkpoint.save_checkpoint too)
LATEST = "latest"
_filesystems: dict[tuple, object] = {}  # see filesystem()


def is_remote(path: str | Path) -> bool:
    """True for a URL with a scheme (``s3://bucket/key``), except ``file://``; False for local paths."""
    m = _SCHEME.match(str(path))
    return m is not None and m.group(1).lower() != "file"


def filesystem(url: str):
    """The fsspec filesystem for ``url``'s scheme.

    One instance per scheme, process and ``AWS_*`` environment (setting up an S3 client costs ~0.15 s), so
    a changed endpoint or credential takes effect at once. fsspec's listing cache is off: a listing never
    misses what another process just wrote.
    """
    m = _SCHEME.match(str(url))
    protocol = m.group(1).lower() if m else "file"
    if m and protocol != "file" and not url[m.end():].split("/", 1)[0]:
        raise FmforgeError(f"bad URL {url!r}: expected {protocol}://BUCKET/PATH")
    if protocol in ("s3", "s3a"):
        try:
            import s3fs  # noqa: F401
        except ImportError:
            raise FmforgeError(f"{url}: s3:// storage needs s3fs: pip install 'fmforge[s3]'") from None
    key = (protocol, os.getpid(), tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    if key not in _filesystems:
        try:
            import fsspec

            _filesystems[key] = fsspec.filesystem(protocol, skip_instance_cache=True, use_listings_cache=False)
        except (ImportError, ValueError) as err:
            raise FmforgeError(f"{url}: no storage backend for {protocol}:// ({_first_line(err)})") from None
    return _filesystems[key]


def backend_errors() -> tuple[type[BaseException], ...]:
    """The exception types a storage backend raises for I/O failures (s3fs turns most into OSError;
    botocore's connection, credential and parameter errors pass through)."""
    errors: tuple[type[BaseException], ...] = (OSError,)
    with contextlib.suppress(ImportError):
        import botocore.exceptions as bx

        errors += (bx.BotoCoreError, bx.ClientError)
    return errors


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _no_such_bucket(err: BaseException | None) -> bool:
    """Whether the backend said the bucket itself is missing (s3fs keeps botocore's error as the cause)."""
    while err is not None:
        response = getattr(err, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") == "NoSuchBucket":
            return True
        err = err.__cause__ or err.__context__
    return False


def _reason(err: BaseException) -> str:
    text = _first_line(err)
    if isinstance(err, FileNotFoundError):
        return "no such bucket" if _no_such_bucket(err) else "not found"
    if isinstance(err, PermissionError):
        return (f"access denied ({text}); check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE), the bucket "
                "policy, and that the bucket exists")
    if type(err).__name__ == "NoCredentialsError":
        return "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    return text


@contextlib.contextmanager
def errors(url: str, action: str) -> Iterator[None]:
    """Turn a backend failure inside the block into ``FmforgeError("cannot ACTION URL: reason")``."""
    try:
        yield
    except FmforgeError:
        raise
    except backend_errors() as err:
        raise FmforgeError(f"cannot {action} {url}: {_reason(err)}") from None


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def _key(fs, url: str) -> str:
    """``url`` as the backend names it in listings (``bucket/key``)."""
    return fs._strip_protocol(url).rstrip("/")


def _find(fs, url: str) -> dict[str, int]:
    """Every file under ``url``: path relative to it → size. One listing; a missing bucket raises. Folder
    entries (which some S3 servers keep after their last file is deleted) are not files."""
    root = _key(fs, url)
    with errors(url, "list"):
        found = fs.find(url, detail=True)
    return {p[len(root) + 1:]: int(info.get("size") or 0) for p, info in found.items()
            if p.startswith(root + "/") and info.get("type") == "file"}


def _put(fs, local_dir: Path, names: list[str], url: str) -> None:
    """Upload ``local_dir/name`` → ``url/name`` for each name (concurrently, in one batch)."""
    if names:
        with errors(url, "upload to"):
            fs.put([str(local_dir / n) for n in names], [_key(fs, _join(url, n)) for n in names])


def _get(fs, url: str, names: list[str], local_dir: Path, suffix: str = "") -> None:
    """Download ``url/name`` → ``local_dir/name + suffix`` for each name (concurrently, in one batch)."""
    if not names:
        return
    for n in names:
        (local_dir / n).parent.mkdir(parents=True, exist_ok=True)
    with errors(url, "download from"):
        fs.get([_key(fs, _join(url, n)) for n in names], [str(local_dir / n) + suffix for n in names])


def exists(url: str) -> bool:
    """Whether a file, or anything under a prefix, exists at ``url``."""
    fs = filesystem(url)
    with errors(url, "check"):
        return bool(fs.exists(url))


def read_text(url: str) -> str:
    fs = filesystem(url)
    with errors(url, "read"):
        data = fs.cat_file(url)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FmforgeError(f"{url} is not UTF-8 text") from None


def write_text(url: str, text: str) -> None:
    fs = filesystem(url)
    with errors(url, "write"):
        fs.pipe_file(url, text.encode("utf-8"))


def list_dir(url: str) -> list[str]:
    """Names of the immediate children (files and prefixes) of ``url``, sorted; an empty or absent prefix
    lists as nothing, a missing bucket is an error."""
    fs = filesystem(url)
    root = _key(fs, url)
    with errors(url, "list"):
        try:
            paths = fs.ls(url, detail=False)
        except FileNotFoundError:
            fs.find(url)  # raises when the bucket itself is missing; an empty prefix just has no children
            return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in paths if p.rstrip("/") != root)


def upload_dir(local_dir: str | Path, url: str) -> list[str]:
    """Upload every file under ``local_dir`` (recursive) to ``url/<relative path>``; returns those paths."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FmforgeError(f"not a directory: {local_dir}")
    names = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    _put(filesystem(url), local_dir, names, url)
    return names


def download_dir(url: str, local_dir: str | Path) -> list[str]:
    """Download every file under ``url`` (recursive) into ``local_dir``; returns their relative paths.
    Nothing under ``url`` is an error."""
    fs = filesystem(url)
    names = sorted(_find(fs, url))
    if not names:
        raise FmforgeError(f"nothing found under {url}")
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    _get(fs, url, names, local_dir)
    return names


# ---- checkpoints: RUN_DIR/checkpoints/step_NNNNNNN/ mirrored to REMOTE_ROOT/step_NNNNNNN/ ----


def _step(name: str) -> int | None:
    m = _STEP.match(name)
    return int(m.group(1)) if m else None


def _scan(fs, remote_root: str) -> dict[str, set[str]]:
    """Checkpoint directory name → the files in it, for everything under ``remote_root`` (one listing)."""
    dirs: dict[str, set[str]] = {}
    for rel in _find(fs, remote_root):
        name, _, rest = rel.partition("/")
        if rest and _step(name) is not None:
            dirs.setdefault(name, set()).add(rest)
    return dirs


def _delete_checkpoint(fs, remote_root: str, name: str) -> None:
    url = _join(remote_root, name)
    with errors(url, "delete"):
        with contextlib.suppress(FileNotFoundError):  # a half-uploaded one has none
            fs.rm_file(_key(fs, _join(url, META)))  # first: a half-deleted checkpoint must never look complete
        with contextlib.suppress(FileNotFoundError):
            fs.rm(_key(fs, url), recursive=True)


def list_remote_checkpoints(remote_root: str) -> list[str]:
    """Names (``step_NNNNNNN``) of the complete checkpoints under ``remote_root`` — those whose meta.json
    arrived — oldest first. A root with nothing under it has none; a missing bucket is an error."""
    dirs = _scan(filesystem(remote_root), remote_root)
    return sorted((n for n, files in dirs.items() if META in files), key=_step)


def mirror_checkpoint(local_ckpt_dir: str | Path, remote_root: str, keep_last: int) -> str:
    """Copy a finished local checkpoint to ``remote_root/<its name>/``, point ``remote_root/latest`` at it
    and prune the remote to ``keep_last``. Returns the checkpoint's URL.

    meta.json goes last (its presence is what makes a remote checkpoint complete); re-mirroring a step
    first deletes the old remote copy, meta.json first. Pruning counts only checkpoints up to this one:
    newer remote ones (an abandoned line, after resuming from an older step) are left alone. Leftovers of
    an interrupted mirror (no meta.json) older than this one are removed.
    """
    from fmforge.train.checkpoint import CorruptCheckpoint

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
    fs = filesystem(remote_root)
    dest = _join(remote_root, src.name)
    if src.name in _scan(fs, remote_root):
        _delete_checkpoint(fs, remote_root, src.name)
    _put(fs, src, files, dest)
    _put(fs, src, [META], dest)
    with errors(remote_root, "write the latest pointer under"):
        fs.pipe_file(_key(fs, _join(remote_root, LATEST)), (src.name + "\n").encode())
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
    from fmforge.train.checkpoint import CorruptCheckpoint, verify_checkpoint

    if _step(name) is None:
        raise FmforgeError(f"{name!r} is not a checkpoint name (expected step_NNNNNNN)")
    local_root = Path(local_root)
    final = local_root / name
    if final.is_dir():
        with contextlib.suppress(CorruptCheckpoint):
            verify_checkpoint(final)
            return final
    url = _join(remote_root, name)
    tmp = local_root / f".tmp_fetch_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        download_dir(url, tmp)
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


def latest_remote_checkpoint(remote_root: str, local_root: str | Path,
                             warn: Callable[[str], None] = print) -> Path | None:
    """Fetch and return the checkpoint ``remote_root/latest`` names if it verifies, else the newest complete
    one that does; corrupt ones are skipped with a warning (as ``checkpoint.latest_valid_checkpoint``).
    None when the remote holds no usable checkpoint."""
    from fmforge.train.checkpoint import CorruptCheckpoint

    candidates = list(reversed(list_remote_checkpoints(remote_root)))
    try:
        named = read_text(_join(remote_root, LATEST)).strip()
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
    fs = filesystem(remote_root)
    newer = [n for n in _scan(fs, remote_root) if _step(n) > step]
    if not newer:
        return
    aside = _join(remote_root, f"abandoned_after_step_{step:07d}_{stamp}")
    for name in sorted(newer, key=_step):
        src, dst = _join(remote_root, name), _join(aside, name)
        with errors(src, "move"):
            fs.copy(_key(fs, src), _key(fs, dst), recursive=True)
        _delete_checkpoint(fs, remote_root, name)
    warn(f"warning: resuming from step {step}: moved {len(newer)} newer remote checkpoint(s) to {aside}")


# ---- prepared data: manifest.json + tokenizer + token shards (see data/prepare.py) ----


def _cache_root() -> Path:
    return Path(os.environ.get("FMFORGE_CACHE") or "~/.cache/fmforge").expanduser() / "data"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize stagers of one cache directory (e.g. every rank of a node): the first downloads, the rest
    find the files in place. No-op where flock does not exist."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _parse_manifest(raw: bytes, url: str) -> dict:
    from fmforge.data.prepare import FORMAT, FORMAT_VERSION

    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FmforgeError(f"{url} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FmforgeError(f"{url} is not an fmforge text-data manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FmforgeError(f"{url} has format version {version!r}; this fmforge reads up to {FORMAT_VERSION}, "
                           "upgrade it")
    try:
        shards = {s["file"]: int(s["tokens"]) for s in manifest["shards"]}
        tokenizer = (manifest["tokenizer"]["file"], manifest["tokenizer"]["sha256"])
    except (KeyError, TypeError, ValueError):
        raise FmforgeError(f"{url} is incomplete: no shard list or tokenizer") from None
    if any("/" in n or n.startswith(".") for n in [*shards, tokenizer[0]]):
        raise FmforgeError(f"{url} names files outside its directory")
    return manifest


def stage_prepared_data(url: str, cache_dir: str | Path | None = None) -> Path:
    """Make the prepared data directory at ``url`` available locally and return the local directory, which
    training memory-maps as usual. A local path is returned unchanged.

    The copy lives in ``CACHE/<first 16 hex of sha256(url)>``, CACHE being ``cache_dir`` or
    ``$FMFORGE_CACHE/data`` (default ``~/.cache/fmforge/data``). The remote manifest is read first and
    decides everything: files already staged for the same manifest are reused when their size matches. Each
    shard's header is checked against its size and the manifest's token count, the tokenizer against the
    manifest's sha256; a file that fails is downloaded once more, then it is an error. The local manifest
    is written last, so a local directory with one is complete.
    """
    from fmforge.data.prepare import MANIFEST, SPECIAL_TOKENS_FILE, load_manifest
    from fmforge.data.shards import read_shard

    if not is_remote(url):
        return Path(str(url).removeprefix("file://"))
    fs = filesystem(url)
    manifest_url = _join(url, MANIFEST)
    with errors(manifest_url, "read"):
        try:
            raw = fs.cat_file(_key(fs, manifest_url))
        except FileNotFoundError as err:
            if _no_such_bucket(err):
                raise
            raise FmforgeError(f"no {MANIFEST} at {url}: not prepared data, or its upload has not finished "
                               "(publish_prepared_data uploads the manifest last)") from None
    manifest = _parse_manifest(raw, manifest_url)
    shards = {s["file"]: int(s["tokens"]) for s in manifest["shards"]}
    tok_file, tok_sha = manifest["tokenizer"]["file"], manifest["tokenizer"]["sha256"]
    remote = _find(fs, url)
    wanted = [tok_file, *shards] + ([SPECIAL_TOKENS_FILE] if SPECIAL_TOKENS_FILE in remote else [])
    missing = [n for n in wanted if n not in remote]
    if missing:
        raise FmforgeError(f"prepared data at {url} is incomplete: its manifest lists {missing[0]}, which is "
                           "not there")

    local = Path(cache_dir).expanduser() if cache_dir is not None else _cache_root()
    local = local / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)

    def problem(name: str) -> str | None:
        path = local / name
        if name == tok_file:
            from fmforge.train.checkpoint import _sha256

            return None if _sha256(path) == tok_sha else f"{_join(url, name)} does not match the manifest's sha256"
        if name in shards:
            try:
                n = len(read_shard(path))
            except FmforgeError as err:
                return str(err).replace(str(path), _join(url, name))
            return None if n == shards[name] else f"{_join(url, name)} holds {n} tokens, the manifest says {shards[name]}"
        return None

    with _locked(local / ".lock"):
        current, pending = local / MANIFEST, local / ".staging_manifest.json"
        up_to_date = current.is_file() and current.read_bytes() == raw
        reuse = up_to_date or (pending.is_file() and pending.read_bytes() == raw)
        if not up_to_date:
            current.unlink(missing_ok=True)  # from here the directory no longer claims to be complete
            pending.write_bytes(raw)  # lets an interrupted staging of the same data resume
        todo = [n for n in wanted if not (reuse and (local / n).is_file()
                                          and (local / n).stat().st_size == remote[n])]
        _fetch_files(fs, url, todo, local)
        bad = [n for n in wanted if problem(n)]
        _fetch_files(fs, url, bad, local)
        for name in bad:
            if why := problem(name):
                raise FmforgeError(f"prepared data at {url} is corrupt: {why} (downloaded again, still bad: "
                                   "prepare and publish it again)")
        for stale in local.glob("*.bin"):  # shards of an earlier version of this data
            if stale.name not in shards:
                stale.unlink()
        if not up_to_date:
            tmp = local / (MANIFEST + ".tmp")
            tmp.write_bytes(raw)
            os.replace(tmp, current)
            pending.unlink()
    load_manifest(local)  # the same checks training applies
    return local


def _fetch_files(fs, url: str, names: list[str], local: Path) -> None:
    """Download each name under a temporary name, then rename it into place."""
    _get(fs, url, names, local, suffix=".part")
    for n in names:
        os.replace(local / (n + ".part"), local / n)


def publish_prepared_data(local_dir: str | Path, url: str) -> None:
    """Upload a prepared data directory to ``url``: the files its manifest names (tokenizer, shards, special
    tokens map), then manifest.json. An existing remote manifest is deleted first, so a remote being
    replaced never looks complete until the new manifest lands."""
    from fmforge.data.prepare import MANIFEST, SPECIAL_TOKENS_FILE, load_manifest

    local_dir = Path(local_dir)
    manifest = load_manifest(local_dir)
    names = [manifest["tokenizer"]["file"], *(s["file"] for s in manifest["shards"])]
    if (local_dir / SPECIAL_TOKENS_FILE).is_file():
        names.append(SPECIAL_TOKENS_FILE)
    fs = filesystem(url)
    with errors(url, "publish to"):
        fs.rm_file(_key(fs, _join(url, MANIFEST)))
    _put(fs, local_dir, names, url)
    _put(fs, local_dir, [MANIFEST], url)
