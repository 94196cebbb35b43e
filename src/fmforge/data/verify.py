"""Checking a prepared directory against its own description (``manifest.json`` for text, ``index.json`` for
images): every file it lists must be there, inside the directory, with its recorded size or token count and,
where one was recorded, its sha256. ``fmforge data verify DATA_DIR`` runs every check; staging remote data
(``staging.py``) runs the same ones on what it downloads.

Directories prepared before shards carried a sha256 still load and verify: their shards are checked for
header, size and token ids, and reported as ``unverified`` (no hash to compare with), never as failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fmforge.data.image_shards import INDEX, load_index
from fmforge.data.manifest import MANIFEST, load_manifest
from fmforge.data.shards import check_token_ids, read_shard
from fmforge.errors import FmforgeError
from fmforge.io.fs import sha256_file
from fmforge.io.paths import UnsafePath, confined


@dataclass(frozen=True)
class Expected:
    """One file a description lists, and what it says about it."""

    name: str
    kind: str  # "tokenizer", "text_shard" or "image_shard"
    sha256: str | None  # None: prepared before shards were hashed
    tokens: int | None = None  # text shards
    size: int | None = None  # image shards


def describe(data_dir: str | Path) -> tuple[str, dict]:
    """("text", manifest) or ("images", index) for a prepared directory, checked as the loaders check it."""
    data_dir = Path(data_dir)
    if (data_dir / MANIFEST).is_file():
        return "text", load_manifest(data_dir)
    if (data_dir / INDEX).is_file():
        return "images", load_index(data_dir)
    if not data_dir.is_dir():
        raise FmforgeError(f"prepared data directory not found: {data_dir}")
    raise FmforgeError(f"{data_dir} holds neither {MANIFEST} (fmforge data prepare) nor {INDEX} "
                       "(fmforge data prepare-images): not prepared data")


def expected_files(kind: str, doc: dict) -> list[Expected]:
    """The files a checked description lists: its tokenizer (if any), then its shards."""
    out = []
    tok = doc.get("tokenizer")
    if tok:
        out.append(Expected(tok["file"], "tokenizer", tok["sha256"]))
    for s in doc["shards"]:
        if kind == "text":
            out.append(Expected(s["file"], "text_shard", s.get("sha256"), tokens=s["tokens"]))
        else:
            size = s.get("bytes")
            out.append(Expected(s["file"], "image_shard", s.get("sha256"),
                                size=size if isinstance(size, int) and not isinstance(size, bool) else None))
    return out


def file_problem(path: Path, e: Expected, *, deep: bool, shown: str, vocab_size: int | None = None) -> str | None:
    """Why the file at ``path`` does not match ``e`` (named ``shown`` in the message), or None. Always: it
    exists, and a text shard's header agrees with its size and the recorded token count, an image shard's
    size with the recorded one. ``deep``: also its sha256 (when recorded), and a text shard's ids against
    ``vocab_size`` (when given)."""
    if not path.is_file():
        return f"{shown} is missing"
    if e.kind == "text_shard":
        try:
            tokens = read_shard(path)
        except FmforgeError as err:
            return str(err).replace(str(path), shown)
        if len(tokens) != e.tokens:
            return f"{shown} holds {len(tokens)} tokens, the manifest says {e.tokens}"
    elif e.size is not None and path.stat().st_size != e.size:
        return f"{shown} is {path.stat().st_size} bytes, the index says {e.size}"
    if not deep:
        return None
    if e.sha256 is not None and sha256_file(path) != e.sha256:
        return f"{shown} does not match its recorded sha256"
    if e.kind == "text_shard" and vocab_size is not None:
        try:
            check_token_ids(tokens, vocab_size, shown)
        except FmforgeError as err:
            return str(err)
    return None


def verify_prepared_data(data_dir: str | Path, *, strict: bool = True,
                         log: Callable[[str], None] | None = print) -> dict:
    """Check every file a prepared directory (text or images) lists: presence, confinement, header/size,
    sha256 where recorded, and (text) token ids below the vocabulary size. Returns
    ``{"path", "kind", "files": [{"file", "status": "ok" | "unverified" | "failed", "problem"}], "verified",
    "unverified", "failed"}``; ``unverified`` files passed every check but carry no sha256 (prepared by an
    older fmforge). ``strict``: any failure ends in a one-line ``FmforgeError`` (after ``log`` has listed them).
    """
    say = log or (lambda _msg: None)
    data_dir = Path(data_dir)
    kind, doc = describe(data_dir)
    vocab = doc["tokenizer"]["vocab_size"] if kind == "text" else None
    description = data_dir / (MANIFEST if kind == "text" else INDEX)
    files = []
    for e in expected_files(kind, doc):
        try:
            path = confined(data_dir, e.name, f"{description} entry")
            problem = file_problem(path, e, deep=True, shown=str(path), vocab_size=vocab)
        except (UnsafePath, OSError) as err:
            problem = str(err)
        status = "failed" if problem else ("unverified" if e.sha256 is None else "ok")
        files.append({"file": e.name, "status": status, "problem": problem})
        if problem:
            say(f"FAILED {problem}")
    counts = {s: sum(f["status"] == s for f in files) for s in ("ok", "unverified", "failed")}
    result = {"path": str(data_dir), "kind": kind, "files": files, "verified": counts["ok"],
              "unverified": counts["unverified"], "failed": counts["failed"]}
    say(f"{data_dir}: {len(files)} files; {counts['ok']} match their sha256, {counts['failed']} failed"
        + (f", {counts['unverified']} carry no sha256 (prepared by an older fmforge: checked for size and "
           "header only; prepare again to hash them)" if counts["unverified"] else ""))
    if strict and counts["failed"]:
        first = next(f["problem"] for f in files if f["problem"])
        raise FmforgeError(f"{data_dir} fails verification: {counts['failed']} of {len(files)} files bad "
                           f"(first: {first})")
    return result
