"""A prepared text directory's description, ``manifest.json``: its names, reading it back with every field that
becomes a path or a size checked, and writing JSON atomically. What training, evaluation and serving need from
a prepared directory, without the preparation pipeline (``prepare.py``) and its scanners.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from fmforge.data.limits import MAX_DESCRIPTION_BYTES
from fmforge.errors import FmforgeError
from fmforge.io.paths import relative_name

FORMAT = "fmforge-text"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"


def check_output_dir(out: Path, marker: str, ours: re.Pattern, what: str, overwrite: bool) -> None:
    """Refuse to write over a finished output (``marker`` present) or over files that look like ours (an
    interrupted run, or someone else's) unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise FmforgeError(f"output {out} exists and is not a directory")
    if overwrite or not out.exists():
        return
    if (out / marker).exists():
        raise FmforgeError(f"{out} already holds {what}; pass --overwrite to replace it")
    clashes = sorted(p.name for p in out.iterdir() if ours.match(p.name))
    if clashes:
        raise FmforgeError(f"{out} already holds {', '.join(clashes[:3])}{' ...' if len(clashes) > 3 else ''} "
                           "(an interrupted run, or not ours); pass --overwrite to replace them")


def write_json_atomic(path: Path, obj: dict, indent: int = 2) -> None:
    """Temp file, fsync, rename: a reader sees the old file or the whole new one, never a torn one. The temp
    file's name carries the process id, so processes writing the same file never share one."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def format_reasons(dropped: Counter) -> str:
    """Drop counts by reason, most frequent first: "empty 3, malformed_json 1"."""
    return ", ".join(f"{reason} {n}" for reason, n in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])))


def read_description(data_dir: str | Path, name: str, fmt: str, max_version: int, *, kind: str, verb: str,
                     what: str) -> dict:
    """Open a prepared directory's JSON description (``name``), checking it is ours (``fmt``) and no newer
    than this fmforge reads. ``kind`` ("data", "image"), ``verb`` (the command that makes it) and ``what``
    (its name in messages) shape the one-line errors."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FmforgeError(f"prepared {kind} directory not found: {data_dir}")
    path = data_dir / name
    if not path.is_file():
        raise FmforgeError(f"no {name} in {data_dir}: create it with `fmforge {verb} INPUT --out {data_dir}`")
    with open(path, "rb") as f:
        raw = f.read(MAX_DESCRIPTION_BYTES + 1)
    if len(raw) > MAX_DESCRIPTION_BYTES:
        raise FmforgeError(f"{path} is larger than {MAX_DESCRIPTION_BYTES >> 20} MiB: not an fmforge {what}")
    return parse_description(raw, str(path), fmt, max_version, what=what,
                             fix=f"run `fmforge {verb}` again with --overwrite")


def parse_description(raw: bytes, where: str, fmt: str, max_version: int, *, what: str, fix: str) -> dict:
    """A manifest's or index's bytes as a dict, checked to be ``fmt`` and no newer than this fmforge reads;
    ``where`` names it in the one-line errors, ``fix`` says what to do about invalid JSON."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise FmforgeError(f"{where} is not valid JSON; {fix}") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise FmforgeError(f"{where} is not an fmforge {what}")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > max_version:
        raise FmforgeError(f"{where} has format version {version!r}; this fmforge reads up to {max_version}, upgrade it")
    return doc


def check_shard_entries(doc: dict, where: str, count_key: str, splits: tuple[str, ...] = ("train", "val")) -> None:
    """Every ``doc["shards"]`` entry is ``{"file": a plain relative name, "split": one of splits,
    count_key: an int >= 0, optional "sha256": 64 hex digits}``, else a one-line error naming the entry.
    Names are checked here, before any becomes a path; ``io.paths.confined`` checks symlinks on open."""
    shards = doc.get("shards")
    if not isinstance(shards, list):
        raise FmforgeError(f"{where} is damaged: its shards are not a list")
    seen = set()
    for n, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise FmforgeError(f"{where} is damaged: shard entry {n} is not an object")
        name = relative_name(entry.get("file"), f"{where}: shard entry {n}")
        if problem := _entry_problem(entry, count_key, splits, name in seen):
            raise FmforgeError(f"{where} is damaged: shard entry {n} ({name}): {problem}")
        seen.add(name)


def _entry_problem(entry: dict, count_key: str, splits: tuple[str, ...], repeated: bool) -> str | None:
    count, sha = entry.get(count_key), entry.get("sha256")
    if entry.get("split") not in splits:
        return f"split {repr(entry.get('split'))[:80]} is not one of {', '.join(splits)}"
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return f"{count_key} {repr(count)[:80]} is not a count"
    if sha is not None and not is_sha256(sha):
        return f"sha256 {repr(sha)[:80]} is not 64 hex digits"
    return "it repeats an earlier shard's file" if repeated else None


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def load_manifest(data_dir: str | Path) -> dict:
    """Read and sanity-check a prepared data directory's manifest."""
    manifest = read_description(data_dir, MANIFEST, FORMAT, FORMAT_VERSION, kind="data", verb="data prepare",
                                what="text-data manifest")
    path = Path(data_dir) / MANIFEST
    check_text_manifest(manifest, str(path))
    return manifest


def check_text_manifest(manifest: dict, where: str) -> None:
    """The parts of a text-data manifest that become paths or sizes, checked before any is used."""
    missing = [k for k in ("shards", "tokens", "tokenizer", "dtype") if k not in manifest]
    if missing:
        raise FmforgeError(f"{where} is incomplete: missing {', '.join(missing)}")
    check_shard_entries(manifest, where, "tokens")
    tok = manifest["tokenizer"]
    if not isinstance(tok, dict) or not is_sha256(tok.get("sha256")):
        raise FmforgeError(f"{where} is damaged: its tokenizer entry has no sha256")
    relative_name(tok.get("file"), f"{where}: tokenizer entry")
    vocab = tok.get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise FmforgeError(f"{where} is damaged: tokenizer vocab_size {repr(vocab)[:80]} is not a positive integer")
