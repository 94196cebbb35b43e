"""Reading the inputs of ``fmforge data prepare-images`` (``image_prepare.py``): class-folder trees and
``.csv`` / ``.jsonl`` image lists become records (image path, how the user named it, caption or label).

Lists are read line by line with a bound (``max_line_bytes``): an over-long line is counted as
``line_too_long`` and never held whole; a row the csv module refuses is ``malformed_csv``. Bad rows are
counted by reason with a few examples each (``Drops``), never fatal.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fmforge.data.limits import bounded_lines
from fmforge.errors import FmforgeError
from fmforge.io.fs import sha256_file

EXAMPLES_PER_REASON = 5


@dataclass
class Record:
    path: Path  # where the image is read from
    source: str  # how the user named it: relative to the class root, or as written in the list
    target: str  # caption, or label name


def _image_suffixes() -> set[str]:
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def numeric_or_text_order(names) -> list[str]:
    names = sorted(set(names))
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return names


def _walk_class_tree(root: Path, dropped: Counter, examples: dict) -> list[Record]:
    suffixes = _image_suffixes()
    records = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(f for f in files if not f.startswith(".")):
            source = (rel_dir / name).as_posix()
            if rel_dir == Path("."):
                _drop(dropped, examples, "outside_class_folder", source)
            elif Path(name).suffix.lower() not in suffixes:
                _drop(dropped, examples, "non_image_file", source)
            else:
                records.append(Record(Path(dirpath, name), source, rel_dir.parts[0]))
    return records


def _list_lines(path: Path, f, max_line_bytes: int, drops: Drops, at: list[int]) -> Iterator[bytes]:
    """The lines of an image list, over-long ones counted and skipped; ``at[0]`` is the current line number."""
    for n, line in enumerate(bounded_lines(f, max_line_bytes), 1):
        at[0] = n
        if line is None:
            drops.add("line_too_long", f"{path}:{n}")
            continue
        yield line[3:] if n == 1 and line.startswith(b"\xef\xbb\xbf") else line


def _csv_text(path: Path, lines: Iterator[bytes], at: list[int]) -> Iterator[str]:
    for line in lines:
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            raise FmforgeError(f"{path} is not UTF-8 (line {at[0]}); save it as UTF-8") from None


def _list_rows(path: Path, drops: Drops, max_line_bytes: int) -> Iterator[tuple[int, dict]]:
    at = [0]
    with open(path, "rb") as f:
        lines = _list_lines(path, f, max_line_bytes, drops, at)
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(_csv_text(path, lines, at))
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error:  # e.g. a field over the csv module's own size limit
                    drops.add("malformed_csv", f"{path}:{at[0]}")
                    continue
                yield at[0], row
        for line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                row = None
            if not isinstance(row, dict):
                drops.add("malformed_json", f"{path}:{at[0]}")
                continue
            yield at[0], row


def _read_list(path: Path, image_field: str, target_field: str, kind: str, drops: Drops,
               max_line_bytes: int) -> list[Record]:
    records = []
    header_checked = path.suffix.lower() != ".csv"
    for n, row in _list_rows(path, drops, max_line_bytes):
        if not header_checked:  # a CSV row has every column of the header: check the names once
            header_checked = True
            for field, flag in ((image_field, "--image-field"), (target_field, f"--{kind}-field")):
                if field not in row:
                    raise FmforgeError(f"{path} has no {field!r} column (it has "
                                       f"{', '.join(repr(k) for k in row if k is not None)}); name it with {flag}")
        where = f"{path}:{n}"
        image, target = row.get(image_field), row.get(target_field)
        if not isinstance(image, str) or not image.strip():
            drops.add("missing_image_path", where)
            continue
        if target is None or (isinstance(target, str) and not target.strip()):
            drops.add(f"missing_{kind}", where)
            continue
        if isinstance(target, (bool, float, dict, list)) or (kind == "caption" and not isinstance(target, str)):
            drops.add(f"bad_{kind}", where)
            continue
        image = image.strip()
        records.append(Record(path.parent / image, image, str(target).strip()))
    return records


def _drop(dropped: Counter, examples: dict, reason: str, where: str) -> None:
    dropped[reason] += 1
    shown = examples.setdefault(reason, [])
    if len(shown) < EXAMPLES_PER_REASON:
        shown.append(where)


class Drops:
    """Dropped records: counted by reason, with the first few sources of each as examples."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, where: str) -> None:
        _drop(self.counts, self.examples, reason, where)


def read_inputs(paths: list[Path], folders: bool, fields: dict | None, drops: Drops,
                max_line_bytes: int) -> tuple[list, list]:
    """Every record of the inputs (class-folder trees, or image lists with these ``fields``) and a
    description of each source for the index."""
    records, sources = [], []
    for p in paths:
        if folders:
            found = _walk_class_tree(p, drops.counts, drops.examples)
            sources.append({"path": str(p), "kind": "class_folders", "files": len(found)})
        else:
            kind, target_field = next((k, v) for k, v in fields.items() if k != "image")
            found = _read_list(p, fields["image"], target_field, kind, drops, max_line_bytes)
            sources.append({"path": str(p), "kind": p.suffix.lower()[1:], "bytes": p.stat().st_size,
                            "sha256": sha256_file(p), "rows": len(found)})
        records += found
    return records, sources
