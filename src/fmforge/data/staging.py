"""Staging prepared data from object storage: ``data.path: s3://...`` is copied once per node into a local
cache (ranks of one node share it under a lock) and verified against its description before any run reads
it; ``publish_prepared_data`` uploads a prepared directory, description last.

Both kinds are staged: text data (``manifest.json``: shard token counts, tokenizer hash, and each shard's
sha256 when it was prepared by an fmforge that records one) and images (``index.json``: each shard's size
and sha256). The remote description decides everything: only the files it lists are fetched, each name
checked to stay inside the cache directory (``io.paths``), and every downloaded file is hashed against it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from fmforge.data.image_shards import FORMAT as IMAGE_FORMAT
from fmforge.data.image_shards import FORMAT_VERSION as IMAGE_FORMAT_VERSION
from fmforge.data.image_shards import INDEX, check_image_index
from fmforge.data.limits import MAX_DESCRIPTION_BYTES, MiB
from fmforge.data.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SPECIAL_TOKENS_FILE,
    check_text_manifest,
    parse_description,
)
from fmforge.data.verify import describe, expected_files, file_problem
from fmforge.errors import FmforgeError
from fmforge.io import fs as remote
from fmforge.io.paths import confined

MAX_SIDE_FILE_BYTES = MiB  # special_tokens_map.json: fetched when present, though no description hashes it


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


def _fetch_description(fs, url: str) -> tuple[str, str, bytes]:
    """(kind, file name, raw bytes) of the remote description: manifest.json (text) or index.json (images),
    read with a size bound."""
    for name, kind in ((MANIFEST, "text"), (INDEX, "images")):
        where = remote.join(url, name)
        with remote.errors(where, "read"):
            try:
                raw = fs.cat_file(remote.key(fs, where), start=0, end=MAX_DESCRIPTION_BYTES + 1)
            except FileNotFoundError as err:
                if remote.no_such_bucket(err):
                    raise
                continue
        if len(raw) > MAX_DESCRIPTION_BYTES:
            raise FmforgeError(f"{where} is larger than {MAX_DESCRIPTION_BYTES >> 20} MiB: not prepared data")
        return kind, name, raw
    raise FmforgeError(f"no {MANIFEST} at {url} (nor an image {INDEX}): not prepared data, or its upload has "
                       "not finished (publish_prepared_data uploads the manifest last)")


def _parse(kind: str, raw: bytes, where: str) -> dict:
    fix = "prepare and publish it again"
    if kind == "text":
        doc = parse_description(raw, where, FORMAT, FORMAT_VERSION, what="text-data manifest", fix=fix)
        check_text_manifest(doc, where)
    else:
        doc = parse_description(raw, where, IMAGE_FORMAT, IMAGE_FORMAT_VERSION, what="image index", fix=fix)
        check_image_index(doc, where)
    return doc


def stage_prepared_data(url: str, cache_dir: str | Path | None = None) -> Path:
    """Make the prepared data directory (text or images) at ``url`` available locally and return the local
    directory, which training reads as usual. A local path is returned unchanged.

    The copy lives in ``CACHE/<first 16 hex of sha256(url)>``, CACHE being ``cache_dir`` or
    ``$FMFORGE_CACHE/data`` (default ``~/.cache/fmforge/data``). The remote description is read first and
    decides everything: only the files it lists are fetched (plus special_tokens_map.json), each name checked
    to stay inside the cache. Files already staged for the same description are reused when their size
    matches. Each file is checked against the description (shard header and token count, image shard size)
    and every file fetched is hashed against its recorded sha256; a file that fails is downloaded once
    more, then it is an error. The local description is written last, so a local directory with one is
    complete (and a complete copy is not hashed again on the next run).
    """
    if not remote.is_remote(url):
        return Path(str(url).removeprefix("file://"))
    fs = remote.filesystem(url)
    kind, desc_name, raw = _fetch_description(fs, url)
    expected = {e.name: e for e in expected_files(kind, _parse(kind, raw, remote.join(url, desc_name)))}
    listed = remote.find(fs, url)
    wanted = list(expected)
    if 0 < listed.get(SPECIAL_TOKENS_FILE, MAX_SIDE_FILE_BYTES + 1) <= MAX_SIDE_FILE_BYTES:
        wanted.append(SPECIAL_TOKENS_FILE)
    missing = [n for n in wanted if n not in listed]
    if missing:
        raise FmforgeError(f"prepared data at {url} is incomplete: its {desc_name} lists {missing[0]}, which is "
                           "not there")

    local = Path(cache_dir).expanduser() if cache_dir is not None else _cache_root()
    local = local / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    paths = {n: confined(local, n, f"{remote.join(url, desc_name)} entry") for n in wanted}

    def problem(name: str, deep: bool) -> str | None:
        e = expected.get(name)
        return None if e is None else file_problem(paths[name], e, deep=deep, shown=remote.join(url, name))

    with _locked(local / ".lock"):
        current, pending = local / desc_name, local / ".staging_manifest.json"
        up_to_date = current.is_file() and current.read_bytes() == raw
        reuse = up_to_date or (pending.is_file() and pending.read_bytes() == raw)
        if not up_to_date:
            for name in (MANIFEST, INDEX):  # from here the directory no longer claims to be complete
                (local / name).unlink(missing_ok=True)
            pending.write_bytes(raw)  # lets an interrupted staging of the same data resume
        todo = [n for n in wanted if not (reuse and paths[n].is_file() and paths[n].stat().st_size == listed[n])]
        _fetch_files(fs, url, todo, local)
        # A complete copy was hashed when it was staged; anything fetched now, or left by an interrupted
        # staging, is hashed now.
        deep = set(todo) if up_to_date else set(wanted)
        bad = [n for n in wanted if problem(n, n in deep)]
        _fetch_files(fs, url, bad, local)
        for name in bad:
            if why := problem(name, True):
                raise FmforgeError(f"prepared data at {url} is corrupt: {why} (downloaded again, still bad: "
                                   "prepare and publish it again)")
        for stale in [*local.glob("*.bin"), *local.glob("*.tar")]:  # shards of an earlier version of this data
            if stale.name not in expected:
                stale.unlink()
        if not up_to_date:
            tmp = local / (desc_name + ".tmp")
            tmp.write_bytes(raw)
            os.replace(tmp, current)
            pending.unlink()
    describe(local)  # the same checks training applies
    return local


def _fetch_files(fs, url: str, names: list[str], local: Path) -> None:
    """Download each name under a temporary name, then rename it into place."""
    remote.get(fs, url, names, local, suffix=".part")
    for n in names:
        os.replace(local / (n + ".part"), local / n)


def publish_prepared_data(local_dir: str | Path, url: str) -> None:
    """Upload a prepared data directory (text or images) to ``url``: the files its description names
    (tokenizer, shards, special tokens map), then the description itself. An existing remote description is
    deleted first, so a remote being replaced never looks complete until the new one lands."""
    local_dir = Path(local_dir)
    kind, doc = describe(local_dir)
    names = [e.name for e in expected_files(kind, doc)]
    for name in names:
        confined(local_dir, name, f"{local_dir} entry")
    if (local_dir / SPECIAL_TOKENS_FILE).is_file():
        names.append(SPECIAL_TOKENS_FILE)
    fs = remote.filesystem(url)
    with remote.errors(url, "publish to"):
        for name in (MANIFEST, INDEX):
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(remote.key(fs, remote.join(url, name)))
    remote.put(fs, local_dir, names, url)
    remote.put(fs, local_dir, [MANIFEST if kind == "text" else INDEX], url)
