"""Staging prepared data from object storage: ``data.path: s3://...`` is copied once per node into a local
cache (ranks of one node share it under a lock) and verified against its manifest (shard token counts,
tokenizer hash) before any run reads it; ``publish_prepared_data`` uploads a prepared directory, manifest
last."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from fmforge.data.prepare import FORMAT, FORMAT_VERSION, MANIFEST, SPECIAL_TOKENS_FILE, load_manifest
from fmforge.data.shards import read_shard
from fmforge.errors import FmforgeError
from fmforge.io import fs as remote


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

    if not remote.is_remote(url):
        return Path(str(url).removeprefix("file://"))
    fs = remote.filesystem(url)
    manifest_url = remote.join(url, MANIFEST)
    with remote.errors(manifest_url, "read"):
        try:
            raw = fs.cat_file(remote.key(fs, manifest_url))
        except FileNotFoundError as err:
            if remote.no_such_bucket(err):
                raise
            raise FmforgeError(f"no {MANIFEST} at {url}: not prepared data, or its upload has not finished "
                               "(publish_prepared_data uploads the manifest last)") from None
    manifest = _parse_manifest(raw, manifest_url)
    shards = {s["file"]: int(s["tokens"]) for s in manifest["shards"]}
    tok_file, tok_sha = manifest["tokenizer"]["file"], manifest["tokenizer"]["sha256"]
    listed = remote.find(fs, url)
    wanted = [tok_file, *shards] + ([SPECIAL_TOKENS_FILE] if SPECIAL_TOKENS_FILE in listed else [])
    missing = [n for n in wanted if n not in listed]
    if missing:
        raise FmforgeError(f"prepared data at {url} is incomplete: its manifest lists {missing[0]}, which is "
                           "not there")

    local = Path(cache_dir).expanduser() if cache_dir is not None else _cache_root()
    local = local / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)

    def problem(name: str) -> str | None:
        path = local / name
        if name == tok_file:
            return None if remote.sha256_file(path) == tok_sha else f"{remote.join(url, name)} does not match the manifest's sha256"
        if name in shards:
            try:
                n = len(read_shard(path))
            except FmforgeError as err:
                return str(err).replace(str(path), remote.join(url, name))
            return None if n == shards[name] else f"{remote.join(url, name)} holds {n} tokens, the manifest says {shards[name]}"
        return None

    with _locked(local / ".lock"):
        current, pending = local / MANIFEST, local / ".staging_manifest.json"
        up_to_date = current.is_file() and current.read_bytes() == raw
        reuse = up_to_date or (pending.is_file() and pending.read_bytes() == raw)
        if not up_to_date:
            current.unlink(missing_ok=True)  # from here the directory no longer claims to be complete
            pending.write_bytes(raw)  # lets an interrupted staging of the same data resume
        todo = [n for n in wanted if not (reuse and (local / n).is_file()
                                          and (local / n).stat().st_size == listed[n])]
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
    remote.get(fs, url, names, local, suffix=".part")
    for n in names:
        os.replace(local / (n + ".part"), local / n)


def publish_prepared_data(local_dir: str | Path, url: str) -> None:
    """Upload a prepared data directory to ``url``: the files its manifest names (tokenizer, shards, special
    tokens map), then manifest.json. An existing remote manifest is deleted first, so a remote being
    replaced never looks complete until the new manifest lands."""
    local_dir = Path(local_dir)
    manifest = load_manifest(local_dir)
    names = [manifest["tokenizer"]["file"], *(s["file"] for s in manifest["shards"])]
    if (local_dir / SPECIAL_TOKENS_FILE).is_file():
        names.append(SPECIAL_TOKENS_FILE)
    fs = remote.filesystem(url)
    with remote.errors(url, "publish to"):
        fs.rm_file(remote.key(fs, remote.join(url, MANIFEST)))
    remote.put(fs, local_dir, names, url)
    remote.put(fs, local_dir, [MANIFEST], url)
