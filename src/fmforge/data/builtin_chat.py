"""Real dialog data that a package ships, as chat JSONL for instruction SFT (no downloads).

chatterbot-corpus (``pip install chatterbot-corpus``) holds hand-written YAML dialogs in ~20 languages: each
"conversation" is a statement followed by one or more replies. Its first reply answers the statement; the
others are mostly alternative answers, not turns of one dialog, so each conversation becomes one
user -> assistant exchange.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fmforge.errors import FmforgeError


def chatterbot_dir(language: str = "english") -> Path:
    try:
        import chatterbot_corpus
    except ImportError:
        raise FmforgeError("chatterbot-corpus is not installed: pip install chatterbot-corpus") from None
    folder = Path(chatterbot_corpus.__file__).parent / "data" / language
    if not folder.is_dir():
        raise FmforgeError(f"chatterbot-corpus has no {language!r} data")
    return folder


def write_chatterbot_chats(path: str | Path, language: str = "english") -> int:
    """Write every (statement, first reply) pair of the language's corpus as a chat JSONL line; returns
    how many. Files are read in name order, so the output is the same on every machine."""
    lines = []
    for file in sorted(chatterbot_dir(language).glob("*.yml")):
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(t, str) and t.strip() for t in conv[:2]):
                messages = [{"role": "user", "content": conv[0].strip()},
                            {"role": "assistant", "content": conv[1].strip()}]
                lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)
