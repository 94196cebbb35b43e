"""Reading the small JSONL files fine-tuning takes (chats, preferences, labelled text): every line that parses and passes
its check is kept; the others are counted by reason, never fatal, and reported once."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fmforge.data.prepare import format_reasons
from fmforge.errors import FmforgeError

IGNORE_INDEX = -100  # a label the losses skip (PyTorch's cross_entropy default)


def read_jsonl(path: Path, problem: Callable[[object], str | None], what: str) -> tuple[list, Counter]:
    """The records of ``path`` for which ``problem(record)`` is None, and the others counted by the reason
    it returns (``invalid_json`` for lines that do not parse). ``what`` describes the expected lines."""
    if not path.is_file():
        raise FmforgeError(f"{what.split(' ')[0]} data not found: {path} (a .jsonl file of {what})")
    records, dropped = [], Counter()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
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
