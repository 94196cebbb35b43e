"""Find input files and read them as a stream of documents, counting (never raising on) bad records.

Inputs are files, directories (searched recursively for known extensions, hidden folders skipped) or
globs, local or in object storage (``s3://bucket/prefix/file.jsonl``, ``s3://bucket/prefix/*.jsonl``, or a
bare ``s3://bucket/prefix`` searched like a directory; read through fsspec, see ``fmforge.storage``).
Plain-text files are cut into documents by the rule in ``textcut.py`` (a file up to 256 KiB stays whole);
``.jsonl`` is one document per line, ``.csv`` / ``.tsv`` one per row (header row first) and ``.parquet``
one per row, the text taken from ``text_field``. Text, JSONL, CSV and TSV files may be compressed
(``.gz``, ``.bz2``, ``.xz``, ``.zst``; see ``compression.py``) and are decompressed while streaming. Every
file a directory walk passes over is counted by extension (``skipped``), so nothing disappears unannounced.
Every source file's size and sha256 are recorded for the manifest, hashed from the same bytes that are
parsed so no file is read twice.

Nothing is read whole without a bound (``limits.py``): a document longer than ``max_document_bytes`` is
counted as ``too_large`` and a JSONL/CSV line longer than ``max_line_bytes`` as ``line_too_long``; both are
read through in pieces (still hashed) and never held in memory. Undecodable bytes cost only their lines
(``encoding_errors``, see ``textcut.py``).
"""

from __future__ import annotations

import csv
import errno
import fnmatch
import glob
import hashlib
import io
import json
import os
import stat
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from fmforge.data.compression import StoredInput, split_compression, zstandard_module
from fmforge.data.limits import (
    MAX_DOCUMENT_BYTES,
    MAX_DOCUMENT_LINE_BYTES,
    bounded_lines,
    check_limit,
    utf8_longer_than,
)
from fmforge.data.textcut import (
    DEFAULT_DOCUMENT_BYTES,
    ENCODING_ERRORS,
    TOO_LARGE,
    LineDecoder,
    bounds,
    cut_documents,
)
from fmforge.errors import FmforgeError
from fmforge.io import fs as remote

TEXT_EXTENSIONS = (".txt", ".md", ".py", ".rst")
TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
STREAMED_EXTENSIONS = TEXT_EXTENSIONS + (".jsonl",) + tuple(TABLE_DELIMITERS)  # these may also be compressed
KNOWN_EXTENSIONS = STREAMED_EXTENSIONS + (".parquet",)
BINARY_SNIFF_BYTES = 8192  # a NUL byte this early means a binary file (git's rule), not text with a bad line
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


def is_known(name: str) -> bool:
    """Whether a directory walk reads a file of this name (hidden names aside)."""
    inner, compression = split_compression(name)
    return inner in STREAMED_EXTENSIONS if compression else inner in KNOWN_EXTENSIONS


def skip_key(name: str) -> str:
    """How a skipped file is counted: its extension with any compression (".log", ".json.gz"), "(hidden)"
    for a hidden file or folder, "(none)" without an extension."""
    if name.startswith("."):
        return "(hidden)"
    inner, compression = split_compression(name)
    return (inner + (compression or "")) or "(none)"


def _walk(directory: Path, skipped: Counter) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(directory):
        if hidden := sum(d.startswith(".") for d in dirs):
            skipped["(hidden)"] += hidden  # .git, .venv, .cache ... counted, not entered
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.startswith(".") and is_known(f):
                found.append(Path(root, f))
            else:
                skipped[skip_key(f)] += 1
    return found


def _walk_remote(fs, prefix: str, skipped: Counter) -> list[str]:
    """``_walk`` for object storage: every known file under ``prefix`` (a key, no scheme) as a URL, in the
    order ``os.walk`` would give (a level's files before its sub-prefixes), hidden names skipped."""
    root = prefix.rstrip("/")
    found = []
    for key in fs.find(root):
        parts = key[len(root) + 1:].split("/") if key.startswith(root + "/") else []
        if not parts:
            continue
        if any(p.startswith(".") for p in parts) or not is_known(parts[-1]):
            skipped[skip_key(next((p for p in parts if p.startswith(".")), parts[-1]))] += 1
            continue
        # sort key: at each level, files (0) before sub-prefixes (1), then by name — os.walk's order
        found.append((tuple((int(i < len(parts) - 1), p) for i, p in enumerate(parts)), key))
    return [fs.unstrip_protocol(key) for _, key in sorted(found)]


def _none_found(where: str, skipped: Counter) -> FmforgeError:
    note = f" (skipped: {format_counts(skipped)})" if skipped else ""
    return FmforgeError(f"input {where} holds no {' '.join(KNOWN_EXTENSIONS)} files, compressed or not{note}")


def format_counts(counts: Counter) -> str:
    """Counts, most frequent first: ".log 3, (hidden) 1"."""
    return ", ".join(f"{key} {n}" for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _hidden_from(pattern: str, key: str) -> bool:
    """Python's glob never lets a wildcard match a name starting with "."; fsspec's does. Keep the local rule:
    a hidden name matches only a pattern part that itself starts with "."."""
    dotted = [c for c in pattern.split("/") if c.startswith(".")]
    return any(p.startswith(".") and not any(fnmatch.fnmatchcase(p, c) for c in dotted) for p in key.split("/"))


def _resolve_remote(url: str, skipped: Counter) -> list[str]:
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
                files += _walk_remote(fs, key, skipped) if info["type"] == "directory" else [fs.unstrip_protocol(key)]
            return files
        info = fs.info(url)
        if info["type"] != "directory":
            return [fs.unstrip_protocol(info["name"])]
        here: Counter = Counter()
        found = _walk_remote(fs, info["name"], here)
        skipped.update(here)
        if not found:
            raise _none_found(url, here)
        return found


def resolve_inputs(inputs: list[str], skipped: Counter | None = None) -> list[Path | str]:
    """Expand inputs into a sorted-per-input, de-duplicated list of files: local ones as Paths, remote ones
    as URLs. Files a directory walk passes over are counted into ``skipped`` by ``skip_key``. A missing
    path, a glob that matches nothing, or a directory without any known file is a user error."""
    if not inputs:
        raise FmforgeError("no inputs given")
    skipped = Counter() if skipped is None else skipped
    files: list[Path | str] = []
    named: dict[Path, tuple[int, int]] = {}
    for item in inputs:
        item = str(item)
        if remote.is_remote(item):
            files += _resolve_remote(item, skipped)
        elif _is_glob(item):
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not matches:
                raise FmforgeError(f"no files match {item!r}")
            # Files a pattern matches count as named explicitly: the user chose them, whatever the extension.
            for m in map(Path, matches):
                files += _walk(m, skipped) if m.is_dir() else [m]
        else:
            p = Path(item).expanduser()
            try:
                st = os.stat(p)  # one call says whether it exists, is a directory, and which file it is
            except OSError as e:
                raise FmforgeError(f"input not found: {item}" if e.errno in (errno.ENOENT, errno.ENOTDIR)
                                   else f"cannot read input {item}: {e.strerror}") from None
            if stat.S_ISDIR(st.st_mode):
                here: Counter = Counter()
                found = _walk(p, here)
                skipped.update(here)
                if not found:
                    raise _none_found(f"directory {item}", here)
                files += found
            else:
                files.append(p)
                named[p] = (st.st_dev, st.st_ino)
    seen, unique = set(), []
    for f in files:
        key = f if isinstance(f, str) else named.get(f) or _identity(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _identity(path: Path) -> object:
    """What makes two local paths the same file: device and inode (one ``stat``, where ``resolve`` costs a call
    per path component; a symlink or hard link names its target's inode), or the resolved path of one that
    cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return path.resolve()
    return (st.st_dev, st.st_ino)


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


def _name(path: Path | str) -> str:
    return path.name if isinstance(path, Path) else PurePosixPath(path).name


def _suffix(path: Path | str) -> str:
    return (path.suffix if isinstance(path, Path) else PurePosixPath(path).suffix).lower()


def _read_up_to(f: IO[bytes], n: int) -> bytes:
    """Up to ``n`` bytes of ``f``, fewer only at its end (a decompressing stream may return short reads)."""
    parts, got = [], 0
    while got < n and (piece := f.read(n - got)):
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


class _Prefixed:
    """``readline`` of a binary stream whose first bytes (``head``) were already read."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self.head = io.BytesIO(head)
        self.stream = stream

    def readline(self, size: int = -1) -> bytes:
        line = self.head.readline(size)
        if line.endswith(b"\n") or 0 <= size <= len(line):
            return line
        return line + self.stream.readline(-1 if size < 0 else size - len(line))


@contextmanager
def _csv_field_limit(limit: int):
    """The csv module's field limit is process-wide: raise it only while this reader parses a row."""
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


class DocumentReader:
    """Iterate documents from files (Paths, or URLs read through fsspec). After (or during) iteration:
    ``read`` records seen, ``dropped`` a Counter of skipped records by reason (read == yielded +
    sum(dropped)), ``dropped_lines`` / ``repaired_lines`` the lines undecodable bytes cost, by reason,
    ``sources`` the files with size and hash (of the stored bytes, compressed or not)."""

    def __init__(self, files: list[Path | str], text_field: str = "text", *,
                 max_document_bytes: int = MAX_DOCUMENT_BYTES, max_line_bytes: int = MAX_DOCUMENT_LINE_BYTES,
                 document_bytes: int = DEFAULT_DOCUMENT_BYTES, encoding_errors: str = "drop-line"):
        self.files = [f if remote.is_remote(f) else Path(f) for f in files]
        self.text_field = text_field
        self.max_document_bytes = check_limit(max_document_bytes, "max_document_bytes")
        self.max_line_bytes = check_limit(max_line_bytes, "max_line_bytes")
        if isinstance(document_bytes, bool) or not isinstance(document_bytes, int) or document_bytes < 0:
            raise FmforgeError(f"document_bytes must be 0 (never cut files) or a positive integer, "
                               f"got {document_bytes!r}")
        if encoding_errors not in ENCODING_ERRORS:
            raise FmforgeError(f"encoding_errors must be one of {', '.join(ENCODING_ERRORS)}, "
                               f"got {encoding_errors!r}")
        self.target_bytes, self.hard_bytes = bounds(document_bytes, self.max_document_bytes)
        self.read = 0
        self.dropped: Counter[str] = Counter()
        self._decoder = LineDecoder(encoding_errors)
        self.dropped_lines = self._decoder.dropped
        self.repaired_lines = self._decoder.repaired
        self.sources: list[SourceFile] = []
        self._filesystems: dict = {}  # scheme → fsspec filesystem, made on first use
        # A remote read can also fail in the backend (connection, credentials), not only with an OSError.
        any_remote = any(isinstance(f, str) for f in self.files)
        self._read_errors = remote.backend_errors() if any_remote else (OSError,)
        if any(_suffix(f) == ".parquet" for f in self.files):
            _import_pyarrow()  # fail before any work, not halfway through the corpus

    def __iter__(self) -> Iterator[Document]:
        for path in self.files:
            inner, compression = split_compression(_name(path))
            try:
                if inner == ".parquet" and compression is None:
                    yield from self._read_parquet(path)
                else:
                    yield from self._read_stored(path, inner, compression)
            except self._read_errors:  # permissions, a file vanishing mid-run: a bad input, not a crash
                self.read += 1
                self.dropped["unreadable"] += 1

    def _read_stored(self, path: Path | str, inner: str, compression: str | None) -> Iterator[Document]:
        """Any file but parquet: decompressed while streaming, parsed by its inner extension."""
        with self._open(path) as raw:
            if compression == ".zst" and zstandard_module() is None:
                stored = StoredInput(raw, None)  # hashed for the manifest, not parsed
                self._skip("needs_zstandard")
                self.sources.append(SourceFile(str(path), *stored.finish()))
                return
            stored = StoredInput(raw, compression)
            records_before = self.read
            try:
                if inner == ".jsonl":
                    yield from self._read_jsonl(stored.stream, str(path))
                elif inner in TABLE_DELIMITERS:
                    yield from self._read_table(stored.stream, str(path), TABLE_DELIMITERS[inner])
                else:
                    yield from self._read_text(stored.stream, str(path))
            except stored.errors:  # corrupt or truncated compressed data: keep what was read, count the file
                self._skip("corrupt_compressed")
            if self.read == records_before:
                self._skip("empty")
            self.sources.append(SourceFile(str(path), *stored.finish()))

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

    def _text_lines(self, f, first: bytes) -> Iterator[bytes | None]:
        """A text file's lines (BOM removed), None for one over the document limit (counted ``too_large``);
        lines holding a NUL byte are dropped and counted."""
        for lineno, line in enumerate(bounded_lines(_Prefixed(first, f), self.max_document_bytes)):
            if line is None:
                if self.target_bytes:  # with cutting off, the whole file is counted too_large instead
                    self._skip("too_large")
            elif b"\x00" in line:
                self.dropped_lines["nul_byte"] += 1
                continue
            elif lineno == 0 and line.startswith(b"\xef\xbb\xbf"):  # an encoding artifact, not text
                line = line[3:]
            yield line

    def _read_text(self, f: IO[bytes], name: str) -> Iterator[Document]:
        first = f.read(BINARY_SNIFF_BYTES)
        if b"\x00" in first:  # binary (or UTF-16, which is not text we can use): the whole file
            self._skip("binary")
            return
        head = first + _read_up_to(f, self.hard_bytes + 1 - len(first)) if first else b""
        if len(head) <= self.hard_bytes and b"\x00" not in head:
            # The common case, without a line loop in Python: the whole file within the bound and no NUL
            # line is one document, as cut_documents would make it (lines split as readline splits them).
            body = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
            # ASCII always decodes: no need for the lines that let undecodable bytes cost only their own line
            lines = [body] if body.isascii() else io.BytesIO(body).readlines()
            documents: Iterable = [lines] if head else []
        else:
            documents = cut_documents(self._text_lines(f, head), self.target_bytes, self.hard_bytes)
        for lines in documents:
            if lines is TOO_LARGE:
                self._skip("too_large")
                continue
            text, n_dropped = self._decoder.lines(lines)
            if n_dropped and not text.strip():
                self._skip("invalid_utf8")
            elif reason := _bad_text(text):
                self._skip(reason)
            else:
                self.read += 1
                yield Document(text, name)

    def _usable(self, text: object) -> str | None:
        """One record's text field if it is a usable document, else None (the drop counted)."""
        if not isinstance(text, str):
            self._skip("missing_text_field")
        elif utf8_longer_than(text, self.max_document_bytes):
            self._skip("too_large")
        elif reason := _bad_text(text):
            self._skip(reason)
        else:
            self.read += 1
            return text
        return None

    def _read_jsonl(self, f: IO[bytes], name: str) -> Iterator[Document]:
        for lineno, line in enumerate(bounded_lines(f, self.max_line_bytes)):
            if line is None:
                self._skip("line_too_long")
                continue
            if lineno == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():  # blank lines separate nothing; they are not records
                continue
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError:
                if self._decoder.policy == "drop-line":  # the line is the record: count it as one
                    self._skip("invalid_utf8")
                    continue
                decoded = self._decoder.line(line)
            try:
                record = json.loads(decoded)
            except json.JSONDecodeError:
                self._skip("malformed_jsonl")
                continue
            if not isinstance(record, dict):
                self._skip("malformed_jsonl")
                continue
            if (text := self._usable(record.get(self.text_field))) is not None:
                yield Document(text, name)

    def _table_lines(self, f: IO[bytes]) -> Iterator[str]:
        for lineno, line in enumerate(bounded_lines(f, self.max_line_bytes)):
            if line is None:
                self._skip("line_too_long")
                continue
            if lineno == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            text = self._decoder.line(line)
            if text is not None:
                yield text

    def _read_table(self, f: IO[bytes], name: str, delimiter: str) -> Iterator[Document]:
        """CSV/TSV: a header row naming the columns, then one document per row from ``text_field``."""
        rows = csv.reader(self._table_lines(f), delimiter=delimiter)
        column = None
        while True:
            try:
                with _csv_field_limit(self.max_line_bytes):
                    row = next(rows)
            except StopIteration:
                return
            except csv.Error:  # e.g. a NUL byte, or an unterminated quote at the end of the file
                self._skip("malformed_csv")
                continue
            if not row or not any(cell.strip() for cell in row):
                continue
            if column is None:
                column = row.index(self.text_field) if self.text_field in row else -1
            elif column < 0 or column >= len(row):
                self._skip("missing_text_field")
            elif (text := self._usable(row[column])) is not None:
                yield Document(text, name)

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
                        if (usable := self._usable(text)) is not None:  # None (a null cell) counts as missing
                            yield Document(usable, name)
            except pa.ArrowException:  # a corrupt page partway through: keep what was read, count the file
                self._skip("malformed_parquet")
