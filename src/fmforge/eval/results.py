"""Evaluation results kept in the run directory, so reports and pipeline gates can read them later.

Every evaluation writes ``RUN_DIR/eval/NAME.json`` (atomically): ``{"kind": KIND, "name": NAME, "created":
ISO time, "fmforge_version": ..., "metrics": {flat str -> number}, ...anything else the kind records}``.
``kind`` says which evaluation wrote it ("perplexity", "vision", "benchmark", "lm_eval", "generation",
"human", "bias", ...); ``metrics`` holds the numbers a gate compares (``${steps.eval.metrics.val_loss}``).
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from fmforge import __version__
from fmforge.errors import FmforgeError

EVAL_DIR = "eval"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
MAX_RESULT_BYTES = 64 << 20


def save_result(run_dir: str | Path, name: str, kind: str, metrics: dict, **extra) -> Path:
    """Write ``RUN_DIR/eval/NAME.json`` and return its path. ``name``: letters, digits, ``_ . -``."""
    if not _NAME.fullmatch(name) or name.endswith(".json"):
        raise FmforgeError(f"bad evaluation result name {name!r}: letters, digits, '_', '.', '-' only")
    out = Path(run_dir) / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    doc = {"kind": kind, "name": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "fmforge_version": __version__, "metrics": metrics, **extra}
    path = out / f"{name}.json"
    tmp = out / f".{name}.json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False, default=float)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_results(run_dir: str | Path) -> list[dict]:
    """Every result in ``RUN_DIR/eval`` (sorted by name); unreadable or foreign files are skipped."""
    found = []
    root = (Path(run_dir) / EVAL_DIR).resolve()
    for path in sorted((Path(run_dir) / EVAL_DIR).glob("*.json")):
        try:
            if path.resolve().parent != root or path.stat().st_size > MAX_RESULT_BYTES:  # no symlink out
                continue
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("kind"), str) and isinstance(doc.get("metrics"), dict):
            found.append(doc)
    return found
