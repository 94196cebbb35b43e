"""Find input files and read them as a stream of documents, counting (never raising on) bad records.

Inputs are files, directories (searched recursively for known extensions, hidden folders skipped) or
globs, local or in object storage (``s3://bucket/prefix/file.jsonl``, ``s3://bucket/prefix/*.jsonl``, or a
bare ``s3://bucket/prefix`` searched like a directory; read through fsspec, see ``fmforge.storage``).
Plain-text files are one document each; ``.jsonl`` is one document per line and ``.parquet`` one per
row, the text taken from ``text_field``. Every source file's size and sha256 are recorded for the manifest,
hashed from the same bytes that are parsed so no file is read twice.

Nothing is read whole without a bound (``limits.py``): a document longer than ``max_document_bytes`` is
counted as ``too_large`` and a JSONL line longer than ``max_line_bytes`` as ``line_too_long``; both are read
through in pieces (still hashed) and never held in memory.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from fmforge.data.limits import (
    MAX_DOCUMENT_BYTES,
    MAX_DOCUMENT_LINE_BYTES,
    MiB,
    bounded_lines,
    check_limit,
    utf8_longer_than,
)
from fmforge.errors import FmforgeError
from fmforge.io import fs as remote

TEXT_EXTENSIONS = (".txt", ".md", ".py", ".rst")
KNOWN_EXTENSIONS = TEXT_EXTENSIONS + (".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 1024
REMOTE_READ_BUFFER = 1 << 20  # fsspec's readline scans a whole block per line; buffer it in C instead


@dataclass(frozen=True)
class Document:
    text: str
    source: str


@dataclass(frozen=True)
class SourceFile:
    path: str
    bytes: int
    sha256: str


def _is_glob(item: str) -> bool:
    return any(c in item for c in "*?[")


def _walk(directory: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .venv, .cache ...
        found += [Path(root, f) for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(KNOWN_EXTENSIONS)]
    return found


def _walk_remote(fs, prefix: str) -> list[str]:
    """``_walk`` for object storage: every known file under ``prefix`` (a key, no scheme) as a URL, in the
    order ``os.walk`` would give (a level's files before its sub-prefixes), hidden names skipped."""
    root = prefix.rstrip("/")
    found = []
    for key in fs.find(root):
        parts = key[len(root) + 1:].split("/") if key.startswith(root + "/") else []
        if parts and not any(p.startswith(".") for p in parts) and parts[-1].lower().endswith(KNOWN_EXTENSIONS):
            # sort key: at each level, files (0) before sub-prefixes (1), then by name — os.walk's order
            found.append((tuple((int(i < len(parts) - 1), p) for i, p in enumerate(parts)), key))
    return [fs.unstrip_protocol(key) for _, key in sorted(found)]


def _hidden_from(pattern: str, key: str) -> bool:
    """Python's glob never lets a wildcard match a name starting with "."; fsspec's does. Keep the local rule:
    a hidden name matches only a pattern part that itself starts with "."."""
    dotted = [c for c in pattern.split("/") if c.startswith(".")]
    return any(p.startswith(".") and not any(fnmatch.fnmatchcase(p, c) for c in dotted) for p in key.split("/"))


def _resolve_remote(url: str) -> list[str]:
    """A remote input as URLs, with the same rules as a local one."""
    fs = remote.filesystem(url)
    with remote.errors(url, "read input"):
        if _is_glob(url):
            pattern = fs._strip_protocol(url)
            matches = {k: v for k, v in fs.glob(url, detail=True).items() if not _hidden_from(pattern, k)}
            if not matches:
                raise FmforgeError(f"no files match {url!r}")
            files = []
            for key, info in sorted(matches.items()):
                files += _walk_remote(fs, key) if info["type"] == "directory" else [fs.unstrip_protocol(key)]
            return files
        info = fs.info(url)
        if info["type"] != "directory":
            return [fs.unstrip_protocol(info["name"])]
        found = _walk_remote(fs, info["name"])
        if not found:
            raise FmforgeError(f"input {url} holds no {' '.join(KNOWN_EXTENSIONS)} files")
        return found


def resolve_inputs(inputs: list[str]) -> list[Path | str]:
    """Expand inputs into a sorted-per-input, de-duplicated list of files: local ones as Paths, remote ones
    as URLs. A missing path, a glob that matches nothing, or a directory without any known file is a user
    error."""
    if not inputs:
        raise FmforgeError("no inputs given")
    files: list[Path | str] = []
    for item in inputs:
        item = str(item)
        if remote.is_remote(item):
            files += _resolve_remote(item)
        elif _is_glob(item):
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not matches:
                raise FmforgeError(f"no files match {item!r}")
            # Files a pattern matches count as named explicitly: the user chose them, whatever the extension.
            for m in map(Path, matches):
                files += _walk(m) if m.is_dir() else [m]
        else:
            p = Path(item).expanduser()
            if not p.exists():
                raise FmforgeError(f"input not found: {item}")
            if p.is_dir():
                found = _walk(p)
                if not found:
                    raise FmforgeError(f"input directory {item} holds no {' '.join(KNOWN_EXTENSIONS)} files")
                files += found
            else:
                files.append(p)
    seen, unique = set(), []
    for f in files:
        key = f if isinstance(f, str) else f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _import_pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise FmforgeError("reading .parquet files needs pyarrow: pip install fmforge[parquet]") from None
    return pa, pq


def _bad_text(text: str) -> str | None:
    """The drop reason for a decoded text, or None when it is usable."""
    if "\x00" in text:
        return "binary"
    if not text.strip():
        return "empty"
    try:  # JSON can smuggle in lone surrogates ("\\ud800") that no UTF-8 writer or tokenizer accepts
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "invalid_utf8"
    return None


def _suffix(path: Path | str) -> str:
    return (path.suffix if isinstance(path, Path) else PurePosixPath(path).suffix).lower()


class DocumentReader:
    """Iterate documents from files (Paths, or URLs read through fsspec). After (or during) iteration:
    ``read`` records seen, ``dropped`` a Counter of skipped records by reason (read == yielded +
    sum(dropped)), ``sources`` the files with size and hash."""

    def __init__(self, files: list[Path | str], text_field: str = "text", *,
                 max_document_bytes: int = MAX_DOCUMENT_BYTES, max_line_bytes: int = MAX_DOCUMENT_LINE_BYTES):
        self.files = [f if remote.is_remote(f) else Path(f) for f in files]
        self.text_field = text_field
        self.max_document_bytes = check_limit(max_document_bytes, "max_document_bytes")
        self.max_line_bytes = check_limit(max_line_bytes, "max_line_bytes")
        self.read = 0
        self.dropped: Counter[str] = Counter()
        self.sources: list[SourceFile] = []
        self._filesystems: dict = {}  # scheme → fsspec filesystem, made on first use
        # A remote read can also fail in the backend (connection, credentials), not only with an OSError.
        any_remote = any(isinstance(f, str) for f in self.files)
        self._read_errors = remote.backend_errors() if any_remote else (OSError,)
        if any(_suffix(f) == ".parquet" for f in self.files):
            _import_pyarrow()  # fail before any work, not halfway through the corpus

    def __iter__(self) -> Iterator[Document]:
        for path in self.files:
            ext = _suffix(path)
            try:
                if ext == ".jsonl":
                    yield from self._read_jsonl(path)
                elif ext == ".parquet":
                    yield from self._read_parquet(path)
                else:
                    yield from self._read_text(path)
            except self._read_errors:  # permissions, a file vanishing mid-run: a bad input, not a crash
                self.read += 1
                self.dropped["unreadable"] += 1

    def _open(self, path: Path | str) -> IO[bytes]:
        if isinstance(path, Path):
            return open(path, "rb")
        return io.BufferedReader(self._filesystem(path).open(path, "rb"), REMOTE_READ_BUFFER)

    def _filesystem(self, url: str):
        scheme = url.split("://", 1)[0].lower()
        if scheme not in self._filesystems:
            self._filesystems[scheme] = remote.filesystem(url)
        return self._filesystems[scheme]

    def _skip(self, reason: str, n: int = 1) -> None:
        self.read += n
        self.dropped[reason] += n

    def _read_text(self, path: Path | str) -> Iterator[Document]:
        sha, size, pieces = hashlib.sha256(), 0, []
        with self._open(path) as f:
            while block := f.read(MiB):
                sha.update(block)
                size += len(block)
                if size <= self.max_document_bytes:
                    pieces.append(block)
                elif pieces:  # too large: keep hashing for the manifest, hold nothing
                    pieces = []
        self.sources.append(SourceFile(str(path), size, sha.hexdigest()))
        if size > self.max_document_bytes:
            self._skip("too_large")
            return
        data = b"".join(pieces)
        # NUL bytes mean binary (or UTF-16, which is valid UTF-8 but not text we can use).
        if b"\x00" in data:
            self._skip("binary")
            return
        try:
            text = data.decode("utf-8-sig")  # a byte-order mark is an encoding artifact, not text
        except UnicodeDecodeError:
            self._skip("invalid_utf8")
            return
        if reason := _bad_text(text):
            self._skip(reason)
            return
        self.read += 1
        yield Document(text, str(path))

    def _read_jsonl(self, path: Path | str) -> Iterator[Document]:
        sha, size = hashlib.sha256(), 0

        def seen(data: bytes) -> None:
            nonlocal size
            sha.update(data)
            size += len(data)

        with self._open(path) as f:
            for lineno, line in enumerate(bounded_lines(f, self.max_line_bytes, seen)):
                if line is None:
                    self._skip("line_too_long")
                    continue
                if lineno == 0 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                if not line.strip():  # blank lines separate nothing; they are not records
                    continue
                try:
                    record = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    self._skip("invalid_utf8")
                    continue
                except json.JSONDecodeError:
                    self._skip("malformed_jsonl")
                    continue
                if not isinstance(record, dict):
                    self._skip("malformed_jsonl")
                    continue
                text = record.get(self.text_field)
                if not isinstance(text, str):
                    self._skip("missing_text_field")
                    continue
                if utf8_longer_than(text, self.max_document_bytes):
                    self._skip("too_large")
                    continue
                if reason := _bad_text(text):
                    self._skip(reason)
                    continue
                self.read += 1
                yield Document(text, str(path))
        self.sources.append(SourceFile(str(path), size, sha.hexdigest()))

    def _read_parquet(self, path: Path | str) -> Iterator[Document]:
        if isinstance(path, Path):
            yield from self._parse_parquet(path, str(path))
            return
        # Parquet is read by random access: copy the object to local disk once, then read it like a local file.
        with tempfile.TemporaryDirectory(prefix="fmforge-parquet-") as tmp:
            local = Path(tmp) / "input.parquet"
            self._filesystem(path).get_file(path, str(local))
            yield from self._parse_parquet(local, path)

    def _parse_parquet(self, path: Path, name: str) -> Iterator[Document]:
        pa, pq = _import_pyarrow()
        # Memory-map once: the hash and the parquet reader share the same pages, and nothing is loaded whole.
        with pa.memory_map(str(path)) as mm:
            buf = mm.read_buffer()
            self.sources.append(SourceFile(name, buf.size, hashlib.sha256(buf).hexdigest()))
            try:
                pf = pq.ParquetFile(pa.BufferReader(buf))
            except (pa.ArrowException, OSError):
                self._skip("malformed_parquet")
                return
            if self.text_field not in pf.schema_arrow.names:
                self._skip("missing_text_field", pf.metadata.num_rows)
                return
            try:
                for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[self.text_field]):
                    column = batch.column(0)
                    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                        self._skip("missing_text_field", len(column))
                        continue
                    for text in column.to_pylist():
                        if text is None:
                            self._skip("missing_text_field")
                        elif utf8_longer_than(text, self.max_document_bytes):
                            self._skip("too_large")
                        elif reason := _bad_text(text):
                            self._skip(reason)
                        else:
                            self.read += 1
                            yield Document(text, name)
            except pa.ArrowException:  # a corrupt page partway through: keep what was read, count the file
                self._skip("malformed_parquet")
