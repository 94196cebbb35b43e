"""Bounds on what fmforge reads from data it did not write: lines, documents, images, descriptions.

Inputs come from crawls, shared buckets and other people's exports. A single 10 GB "line", a 97 KB PNG that
decodes to 100 megapixels, or a manifest of a billion entries must cost a counted skip or a one-line error,
never the machine's memory. Every limit here is a default; the functions that read take a parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import IO

from fmforge.errors import FmforgeError

MiB = 1 << 20
# One image may decode to at most this many pixels (Pillow's own refusal starts near 179 Mpx, ~0.5 GB of
# RGB per decode); checked from the header, before any pixel is decoded.
MAX_PIXELS = 40_000_000
# An image file (or a stored image in a shard) larger than this is not read at all: 8 bytes per pixel of
# the largest allowed image (16-bit RGBA) plus room for metadata.
MAX_IMAGE_FILE_BYTES = 8 * MAX_PIXELS + 64 * MiB
# One caption or label stored beside an image in a shard.
MAX_TARGET_BYTES = 1 * MiB
# One row of a record file: image lists (.csv/.jsonl), chat, preference and labelled JSONL.
MAX_RECORD_LINE_BYTES = 1 * MiB
# One pretraining document (a text file, or the text of one JSONL/parquet record), in UTF-8 bytes.
MAX_DOCUMENT_BYTES = 64 * MiB
# One line of a pretraining JSONL file holds a whole document: JSON escapes may double its size.
MAX_DOCUMENT_LINE_BYTES = 2 * MAX_DOCUMENT_BYTES
# manifest.json / index.json: far above any real one (a million shards is ~150 MB).
MAX_DESCRIPTION_BYTES = 256 * MiB
_SKIP_PIECE = 4 * MiB  # how much of an over-long line is held at once while reading past it


def check_limit(value: int, name: str) -> int:
    """``value`` if it is a positive int, else a one-line error naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FmforgeError(f"{name} must be a positive integer, got {value!r}")
    return value


def bounded_lines(f: IO[bytes], max_bytes: int, seen: Callable[[bytes], None] | None = None
                  ) -> Iterator[bytes | None]:
    """Each line of the binary file ``f`` (newline included), or None for a line whose content passes
    ``max_bytes``: that line is read through in pieces and never held whole. ``seen`` receives every byte
    read, in order (to hash the file while parsing it)."""
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        if seen is not None:
            seen(line)
        if len(line) <= max_bytes or line.endswith(b"\n"):
            yield line
            continue
        while piece := f.readline(_SKIP_PIECE):
            if seen is not None:
                seen(piece)
            if piece.endswith(b"\n"):
                break
        yield None


def utf8_longer_than(text: str, max_bytes: int) -> bool:
    """Whether ``text`` takes more than ``max_bytes`` in UTF-8 (1 to 4 bytes per character)."""
    if len(text) > max_bytes:
        return True
    if 4 * len(text) <= max_bytes:
        return False
    return len(text.encode("utf-8", "surrogatepass")) > max_bytes


def pixels_problem(size: tuple[int, int], max_pixels: int) -> str | None:
    """A description of why an image of ``size`` (width, height) is refused, or None."""
    width, height = size
    if width * height > max_pixels:
        return f"{width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,}"
    return None
