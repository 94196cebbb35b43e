"""Reading the small JSONL files fine-tuning takes (chats, preferences, labelled text): every line that parses and passes
its check is kept; the others are counted by reason, never fatal, and reported once. A line longer than
``max_line_bytes`` (default ``limits.MAX_RECORD_LINE_BYTES``, 1 MiB) is counted as ``line_too_long`` without
ever being held whole."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from fmforge.data.limits import MAX_RECORD_LINE_BYTES, bounded_lines
from fmforge.data.manifest import format_reasons
from fmforge.errors import FmforgeError

IGNORE_INDEX = -100  # a label the losses skip (PyTorch's cross_entropy default)


def text_lines(path: Path, dropped: Counter, max_line_bytes: int = MAX_RECORD_LINE_BYTES) -> Iterator[str]:
    """The non-blank lines of ``path`` as text (undecodable bytes replaced), over-long ones counted in
    ``dropped`` as ``line_too_long`` and skipped."""
    with open(path, "rb") as f:
        for line in bounded_lines(f, max_line_bytes):
            if line is None:
                dropped["line_too_long"] += 1
            elif line.strip():
                yield line.decode("utf-8", errors="replace")


def read_jsonl(path: Path, problem: Callable[[object], str | None], what: str,
               max_line_bytes: int = MAX_RECORD_LINE_BYTES) -> tuple[list, Counter]:
    """The records of ``path`` for which ``problem(record)`` is None, and the others counted by the reason
    it returns (``invalid_json`` for lines that do not parse, ``line_too_long`` for lines longer than
    ``max_line_bytes``). ``what`` describes the expected lines."""
    if not path.is_file():
        raise FmforgeError(f"{what.split(' ')[0]} data not found: {path} (a .jsonl file of {what})")
    records, dropped = [], Counter()
    for line in text_lines(path, dropped, max_line_bytes):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            dropped["invalid_json"] += 1
            continue
        reason = problem(record)
        if reason:
            dropped[reason] += 1
        else:
            records.append(record)
    return records, dropped


def report_dropped(echo, path: Path, dropped: Counter, what: str) -> None:
    if dropped:
        echo(f"warning: {path}: skipped {sum(dropped.values())} {what}: {format_reasons(dropped)}")
