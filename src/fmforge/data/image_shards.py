"""Prepared image directories (``fmforge data prepare-images``, ``image_prepare.py``): the format and its
reader. A directory holds ``train_*.tar`` / ``val_*.tar`` WebDataset shards and ``index.json`` (written
last, so a directory with an index is complete). Per sample, a shard holds ``KEY.<jpg|png|webp>``,
``KEY.cls`` (ASCII label index) or ``KEY.txt`` (UTF-8 caption), and ``KEY.json`` (``{"source": ...}``):
WebDataset's layout, readable by ``webdataset`` too.

The reader trusts none of it blindly: shard names must stay inside the directory, a stored image is read
only up to ``MAX_IMAGE_FILE_BYTES`` and decoded only when its header says at most ``max_pixels`` pixels
(``ImageTooLarge`` otherwise, which the image loader counts and replaces like an undecodable sample).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fmforge.data.limits import (
    MAX_IMAGE_FILE_BYTES,
    MAX_PIXELS,
    MAX_TARGET_BYTES,
    check_limit,
    pixels_problem,
)
from fmforge.data.manifest import check_shard_entries, is_sha256, read_description
from fmforge.errors import FmforgeError
from fmforge.io.paths import confined, relative_name

FORMAT = "fmforge-images"
FORMAT_VERSION = 1
INDEX = "index.json"
IMAGE_EXTENSIONS = ("jpg", "png", "webp")


def load_index(data_dir: str | Path) -> dict:
    """Read and sanity-check a prepared image directory's index."""
    index = read_description(data_dir, INDEX, FORMAT, FORMAT_VERSION, kind="image", verb="data prepare-images",
                             what="image index")
    path = Path(data_dir) / INDEX
    check_image_index(index, str(path))
    return index


def check_image_index(index: dict, where: str) -> None:
    """The parts of an image index that become paths or counts, checked before any is used."""
    missing = [k for k in ("mode", "classes", "samples", "shards") if k not in index]
    if missing or index["mode"] not in ("classification", "captions") or not isinstance(index["shards"], list):
        raise FmforgeError(f"{where} is incomplete or damaged{': missing ' + ', '.join(missing) if missing else ''}")
    check_shard_entries(index, where, "samples")
    tok = index.get("tokenizer")
    if tok is not None:
        if not isinstance(tok, dict) or not is_sha256(tok.get("sha256")):
            raise FmforgeError(f"{where} is damaged: its tokenizer entry has no sha256")
        relative_name(tok.get("file"), f"{where}: tokenizer entry")


class ImageTooLarge(FmforgeError):
    """A stored image whose header (or byte size) is over the reader's limit: never decoded."""


class ImageShards:
    """Random access to one split of a prepared image directory.

    Opening scans each shard's tar headers once (no image data is read) into an offset table, so a sample
    is one ``pread`` of its bytes. Safe to share between threads; picklable (file handles reopen lazily).
    max_pixels: larger stored images raise ``ImageTooLarge`` instead of being decoded."""

    def __init__(self, data_dir: str | Path, split: str, max_pixels: int = MAX_PIXELS):
        self.data_dir = Path(data_dir)
        self.index = load_index(self.data_dir)
        self.split = split
        self.max_pixels = check_limit(max_pixels, "max_pixels")
        self.mode = self.index["mode"]
        self.classes = self.index["classes"]
        self.files = [s["file"] for s in self.index["shards"] if s.get("split") == split]
        shard_of, offsets, exts, keys = [], [], [], []
        for n, entry in enumerate(s for s in self.index["shards"] if s.get("split") == split):
            table = _scan_shard(self._path(entry["file"]))
            if len(table) != entry.get("samples"):
                raise FmforgeError(f"{entry['file']} holds {len(table)} samples but {INDEX} says "
                                   f"{entry.get('samples')}: it changed after preparation; prepare again")
            for key, members in table.items():
                ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
                target = members.get("cls" if self.mode == "classification" else "txt")
                if ext is None or target is None:
                    raise FmforgeError(f"sample {key} in {entry['file']} lacks its image or "
                                       f"{'label' if self.mode == 'classification' else 'caption'}")
                shard_of.append(n)
                offsets.append((*members[ext], *target))
                exts.append(ext)
                keys.append(key)
        if not offsets:
            raise FmforgeError(f"the {split} split of {self.data_dir} is empty")
        self.shard_of = np.array(shard_of, dtype=np.int32)
        self.offsets = np.array(offsets, dtype=np.int64)  # image offset, image size, target offset, size
        self.exts, self.keys = exts, keys
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def _path(self, name: str) -> Path:
        return confined(self.data_dir, name, f"{self.data_dir / INDEX} shard")

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._fds.get(shard)
        if fd is None:
            opened = os.open(self._path(self.files[shard]), os.O_RDONLY)
            fd = self._fds.setdefault(shard, opened)  # two threads may race here: keep one descriptor
            if fd != opened:
                os.close(opened)
        return os.pread(fd, size, offset)

    def raw(self, i: int) -> tuple[bytes, bytes]:
        """The encoded image bytes and the raw label/caption bytes of sample ``i`` (``ImageTooLarge`` for
        members bigger than any image or caption fmforge writes)."""
        shard = int(self.shard_of[i])
        io_, isz, to, tsz = (int(v) for v in self.offsets[i])
        if isz > MAX_IMAGE_FILE_BYTES or tsz > MAX_TARGET_BYTES:
            raise ImageTooLarge(f"{self.where(i)}: stored sample is {isz:,} + {tsz:,} bytes, above the limits of "
                                f"{MAX_IMAGE_FILE_BYTES:,} (image) and {MAX_TARGET_BYTES:,} (label or caption)")
        return self._read(shard, io_, isz), self._read(shard, to, tsz)

    def target(self, i: int) -> int | str:
        raw = self.raw(i)[1]
        return int(raw) if self.mode == "classification" else raw.decode("utf-8")

    def image(self, i: int) -> Image.Image:
        """Sample ``i`` decoded to RGB, EXIF orientation applied. Raises on undecodable bytes, and
        ``ImageTooLarge`` (before decoding) when its header says more than ``max_pixels`` pixels."""
        with Image.open(io.BytesIO(self.raw(i)[0])) as im:
            if problem := pixels_problem(im.size, self.max_pixels):
                raise ImageTooLarge(f"{self.where(i)}: image is {problem}")
            return ImageOps.exif_transpose(im).convert("RGB")

    def where(self, i: int) -> str:
        return f"{self.files[int(self.shard_of[i])]}:{self.keys[i]}"


def _scan_shard(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """{key: {extension: (data offset, size)}}: WebDataset's key is the member name up to its first dot."""
    if not path.is_file():
        raise FmforgeError(f"shard {path} is missing; prepare the images again")
    table: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile():
                    base = m.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    table.setdefault(key, {})[ext.lower()] = (m.offset_data, m.size)
    except tarfile.TarError as err:
        raise FmforgeError(f"shard {path} is damaged ({err}); prepare the images again") from None
    return table
