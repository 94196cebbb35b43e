"""Streaming decompression of input files, hashed as stored.

A file named ``x.jsonl.gz`` is read as ``x.jsonl``: gzip, bz2 and xz through the standard library, zstd
through the optional ``zstandard`` package (``pip install zstandard``; without it a ``.zst`` file is counted
as ``needs_zstandard``). The size and sha256 recorded for the manifest are those of the stored
(compressed) bytes, hashed while they are decompressed, so no file is read twice.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import zlib
from pathlib import PurePosixPath
from typing import IO

from fmforge.data.limits import MiB

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
ZSTANDARD_HINT = "pip install 'fmforge[zstd]'"


def split_compression(name: str) -> tuple[str, str | None]:
    """(inner suffix, compression suffix or None) of a file name, lowercased: "a.JSONL.gz" → (".jsonl", ".gz")."""
    p = PurePosixPath(name.lower())
    if p.suffix in COMPRESSIONS:
        return PurePosixPath(p.stem).suffix, p.suffix
    return p.suffix, None


def zstandard_module():
    """The ``zstandard`` module, or None when it is not installed."""
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


class _Hashing(io.RawIOBase):
    """A read-only view of a binary stream that hashes and counts every byte read through it."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        self.size += n
        return n


class StoredInput:
    """An opened input file: ``stream`` yields its decompressed bytes (readline, read); ``errors`` are the
    exceptions that mean its compressed data is corrupt; ``finish()`` hashes whatever was not read and returns
    (size, sha256) of the stored bytes."""

    def __init__(self, raw: IO[bytes], compression: str | None):
        self._hashing = _Hashing(raw)
        self.errors: tuple[type[BaseException], ...] = ()
        if compression is None:
            self.stream: IO[bytes] = io.BufferedReader(self._hashing, MiB)
            return
        self.errors = (OSError, EOFError, zlib.error, lzma.LZMAError)  # BadGzipFile is an OSError
        if compression == ".gz":
            self.stream = gzip.GzipFile(fileobj=self._hashing, mode="rb")
        elif compression == ".bz2":
            self.stream = bz2.BZ2File(self._hashing, "rb")
        elif compression == ".xz":
            self.stream = lzma.LZMAFile(self._hashing, "rb")
        elif compression == ".zst":
            zstd = zstandard_module()
            if zstd is None:
                raise ValueError(f"reading .zst files needs the zstandard package: {ZSTANDARD_HINT}")
            self.errors += (zstd.ZstdError,)
            reader = zstd.ZstdDecompressor().stream_reader(self._hashing, read_across_frames=True)
            self.stream = io.BufferedReader(reader, MiB)
        else:
            raise ValueError(f"unknown compression {compression!r}")

    def finish(self) -> tuple[int, str]:
        while self._drain_block():
            pass
        return self._hashing.size, self._hashing.sha.hexdigest()

    def _drain_block(self) -> bool:
        block = self._hashing.raw.read(MiB)
        self._hashing.sha.update(block)
        self._hashing.size += len(block)
        return bool(block)
