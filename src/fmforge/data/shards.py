"""Binary token shards: a 32-byte header, then the token ids as raw little-endian integers.

Header (little-endian): magic ``b"FMFTOKS\\0"`` (8 bytes), version uint32, itemsize uint32 (2 or 4),
token count uint64, 8 reserved zero bytes. The count in the header lets a reader tell a complete shard from
a truncated one without any side file; the raw layout lets training memory-map a shard and slice it. The
writer records each finished shard's sha256 (of the whole file) for the manifest; a reader checks the ids
against the vocabulary once per shard (``check_token_ids``), since an out-of-range id is a device-side
assert on a GPU rather than an error.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from fmforge.errors import FmforgeError
from fmforge.io.fs import sha256_file

MAGIC = b"FMFTOKS\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, itemsize, count, reserved
HEADER_SIZE = HEADER.size  # 32


def shard_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every id: uint16 halves disk and memory traffic for vocabularies ≤ 65536."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def _fsync_dir(path: Path) -> None:
    # A rename is only durable once the directory entry is; not possible (or needed) on every OS.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardWriter:
    """Append tokens for one split; starts a new ``{split}_{i:06d}.bin`` every ``shard_tokens`` tokens.

    Each shard is written under a ``.tmp`` name and renamed only once complete and fsynced, so a crash never
    leaves a file with a final name and wrong contents.
    """

    def __init__(self, out_dir: str | Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir = Path(out_dir)
        self.split = split
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype.itemsize not in (2, 4) or self.dtype.kind != "u":
            raise ValueError(f"token shards hold uint16 or uint32, not {dtype}")
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._tmp: Path | None = None
        self._count = 0  # tokens in the open shard

    def _name(self) -> str:
        return f"{self.split}_{len(self.shards):06d}.bin"

    def _open(self) -> None:
        self._tmp = self.out_dir / (self._name() + ".tmp")
        self._file = open(self._tmp, "wb")
        self._file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, 0))  # count filled in on finish
        self._count = 0

    def _finish(self) -> None:
        f, name = self._file, self._name()
        f.seek(0)
        f.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self._count))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(self._tmp, self.out_dir / name)
        self.shards.append({"file": name, "split": self.split, "tokens": self._count,
                            "sha256": sha256_file(self.out_dir / name)})  # read back: still in the page cache
        self._file, self._tmp = None, None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id out of range for {self.dtype.name} shards")
        tokens = tokens.astype(self.dtype, copy=False).ravel()
        pos = 0
        while pos < tokens.size:
            if self._file is None:
                self._open()
            take = min(tokens.size - pos, self.shard_tokens - self._count)
            self._file.write(tokens[pos:pos + take].tobytes())
            self._count += take
            pos += take
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict]:
        """Finish the last shard and return ``[{"file", "split", "tokens", "sha256"}]`` for every shard written."""
        if self._file is not None:
            if self._count:
                self._finish()
            else:
                self.abort()
        _fsync_dir(self.out_dir)
        return list(self.shards)

    def abort(self) -> None:
        """Drop the partial shard (after an error); completed shards stay."""
        if self._file is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._file, self._tmp = None, None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens read-only, after checking its header against the file size."""
    path = Path(path)

    def corrupt(reason: str) -> FmforgeError:
        return FmforgeError(f"corrupt token shard {path}: {reason}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
    except FileNotFoundError:
        raise FmforgeError(f"token shard not found: {path}") from None
    except OSError as err:
        raise FmforgeError(f"cannot read token shard {path}: {err.strerror}") from None
    if len(head) < HEADER_SIZE:
        raise corrupt(f"{size} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, itemsize, count = HEADER.unpack(head)
    if magic != MAGIC:
        raise corrupt("bad magic (not an fmforge token shard)")
    if version != VERSION:
        raise corrupt(f"unsupported version {version} (this fmforge reads version {VERSION})")
    if itemsize not in (2, 4):
        raise corrupt(f"bad itemsize {itemsize} (expected 2 or 4)")
    expected = HEADER_SIZE + count * itemsize
    if size != expected:
        raise corrupt(f"file is {size} bytes but its header promises {expected} ({count} tokens); truncated?")
    dtype = np.dtype("<u2") if itemsize == 2 else np.dtype("<u4")
    if count == 0:  # np.memmap refuses an empty mapping
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,))


CHECK_BLOCK = 1 << 24  # ids per block when scanning a shard: bounded memory on any shard size


def check_token_ids(tokens: np.ndarray, vocab_size: int, name: str) -> None:
    """A one-line error naming the shard when any id is ``>= vocab_size`` (what embedding lookups index)."""
    if tokens.size == 0 or np.iinfo(tokens.dtype).max < vocab_size:
        return  # the dtype cannot even hold an out-of-range id
    for start in range(0, tokens.size, CHECK_BLOCK):
        block = tokens[start: start + CHECK_BLOCK]
        top = int(block.max())
        if top >= vocab_size:
            at = start + int(np.argmax(block >= vocab_size))
            raise FmforgeError(f"token shard {name} holds id {top} (first out-of-range id at position {at}), "
                               f"but the vocabulary has {vocab_size} ids: the shard does not belong to this "
                               "tokenizer, or is damaged; prepare the data again")
