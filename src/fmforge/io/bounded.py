"""Reading small files that may come from someone else: at most ``max_bytes`` are ever read, and every
failure is one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

from fmforge.errors import FmforgeError


def read_bounded(path: str | Path, max_bytes: int, what: str = "") -> bytes:
    """The bytes of ``path`` if it holds at most ``max_bytes``; ``what`` ("template ") prefixes the name."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as err:
        raise FmforgeError(f"cannot read {what}{path}: {err.strerror or err}") from None
    if len(raw) > max_bytes:
        raise FmforgeError(f"{what}{path} is larger than {max_bytes:,} bytes; refusing to read it")
    return raw


def read_json_object(path: str | Path, max_bytes: int) -> dict:
    """A JSON object from a file of at most ``max_bytes``; anything else is a one-line error naming it."""
    raw = read_bounded(path, max_bytes)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, an integer of thousands of digits, deep nesting
        raise FmforgeError(f"{path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise FmforgeError(f"{path} is not valid JSON: expected an object")
    return data
