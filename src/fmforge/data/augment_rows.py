"""``fmforge data augment``: counterfactual data augmentation (``augment.py``) of fine-tuning JSONL — chat
(``messages``), SFT (``prompt``/``response``/``completion``), preference (``prompt``/``chosen``/``rejected``)
and classification (``text`` + ``label``) rows. The chosen text fields of a row are rewritten together (one
draw per row, from a hash of the seed and the row), so a conversation never mixes both versions; every
other field (labels, roles, ids) is copied as is. Lines that are not JSON objects are counted and skipped."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fmforge.data.augment import Swapper, augment_settings, chosen, load_swapper
from fmforge.data.limits import MAX_RECORD_LINE_BYTES
from fmforge.data.manifest import format_reasons
from fmforge.data.records import text_lines
from fmforge.errors import FmforgeError, clip

DEFAULT_FIELDS = ("text", "prompt", "response", "completion", "chosen", "rejected", "messages")
# The text of one message inside a list field: OpenAI-style "content", ShareGPT-style "value".
MESSAGE_TEXT = ("content", "value")


def _swap_value(value, swapper: Swapper, swapped: Counter):
    """A field's value with its text swapped: a string, or a list of messages (their content / value)."""
    if isinstance(value, str):
        new, found = swapper.swap(value)
        swapped.update(found)
        return new
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, dict):
                item = {k: _swap_value(v, swapper, swapped) if k in MESSAGE_TEXT and isinstance(v, str) else v
                        for k, v in item.items()}
            elif isinstance(item, str):
                item = _swap_value(item, swapper, swapped)
            out.append(item)
        return out
    return value


def counterfactual_row(row: dict, fields: tuple[str, ...], swapper: Swapper) -> tuple[dict, Counter]:
    """``row`` with ``fields`` swapped (others copied), and the swaps counted by word."""
    swapped: Counter = Counter()
    new = {k: _swap_value(v, swapper, swapped) if k in fields else v for k, v in row.items()}
    return new, swapped


def _check_paths(src: Path, out: Path, overwrite: bool) -> None:
    if not src.is_file():
        raise FmforgeError(f"input not found: {src} (a .jsonl file of chat, SFT, preference or labelled rows)")
    if out.resolve() == src.resolve():
        raise FmforgeError(f"--out {out} is the input itself; write the augmented rows to a new file")
    if out.exists() and (out.is_dir() or not overwrite):
        raise FmforgeError(f"{out} already exists" + ("" if out.is_dir() else "; pass --overwrite to replace it"))


def augment_jsonl(input: str | Path, out: str | Path, *, augment: str = "cda", augment_mode: str = "two-sided",
                  augment_p: float | None = None, augment_seed: int = 0, augment_names: bool = False,
                  fields: list[str] | None = None, overwrite: bool = False,
                  max_line_bytes: int = MAX_RECORD_LINE_BYTES, log: Callable[[str], None] | None = print) -> dict:
    """Write ``out``: the rows of ``input`` with counterfactual copies (``two-sided``) or counterfactual
    substitutes (``substitute``), each row with probability ``augment_p``; ``fields`` are the text fields
    rewritten (default ``DEFAULT_FIELDS``; list fields rewrite each message's ``content`` / ``value``).
    Returns the counts: rows read, written, augmented, words swapped, skipped lines by reason."""
    say = log or (lambda _msg: None)
    src, out = Path(input), Path(out)
    settings = augment_settings(augment, augment_mode, augment_p, augment_seed, augment_names)
    if settings is None:
        raise FmforgeError("data augment needs --augment cda or cda=PAIRS_FILE")
    _check_paths(src, out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    wanted = tuple(fields) if fields else DEFAULT_FIELDS
    swapper = load_swapper(settings)
    counts, words, dropped = Counter(), Counter(), Counter()
    keys: set[str] = set()
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in text_lines(src, dropped, max_line_bytes):
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    dropped["invalid_json"] += 1
                    continue
                if not isinstance(row, dict):
                    dropped["not_an_object"] += 1
                    continue
                counts["rows_read"] += 1
                keys.update(row.keys())
                rows = [row]
                key = json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8")
                if chosen(settings["seed"], key, settings["p"]):
                    new, swapped = counterfactual_row(row, wanted, swapper)
                    if swapped:
                        counts["rows_augmented"] += 1
                        counts["words_swapped"] += swapped.total()
                        words.update(swapped)
                        rows = [row, new] if settings["mode"] == "two-sided" else [new]
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                counts["rows_written"] += len(rows)
        if not counts["rows_read"]:
            raise FmforgeError(f"nothing to augment in {src}: no JSON object rows"
                               + (f" (skipped {format_reasons(dropped)})" if dropped else ""))
        if not keys & set(wanted):
            raise FmforgeError(f"none of the fields {', '.join(wanted)} is in {src}; its rows have "
                               f"{', '.join(clip(k, 40) for k in sorted(keys)[:10])} (choose with --fields)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    result = {"input": str(src), "out": str(out), "augment": settings, "fields": list(wanted), **counts,
              "skipped": dict(dropped), "top_swapped": dict(words.most_common(20))}
    say(f"wrote {out}: {counts['rows_written']} rows from {counts['rows_read']} ({counts['rows_augmented']} "
        f"augmented, {settings['mode']}, {counts['words_swapped']} words swapped)"
        + (f"; skipped {format_reasons(dropped)}" if dropped else ""))
    return result


def augment_command(input: str, out: str, *, json_out: bool = False, **kwargs) -> dict:
    """``fmforge data augment``: ``augment_jsonl``, its counts printed as JSON with ``--json``."""
    result = augment_jsonl(input, out, log=None if json_out else print, **kwargs)
    if json_out:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return result
