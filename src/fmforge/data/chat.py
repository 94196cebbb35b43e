"""Chat-format JSONL for instruction SFT (``objectives/sft.py``): one conversation per line, ``{"messages": [{"role": "system" |
"user" | "assistant", "content": "..."}, ...]}``. The loss counts only the assistant's tokens (its replies
and the end-of-text that closes each), so the model learns to answer, not to imitate users.

The chat template is plain text, so it works with any tokenizer, and ships with the model as a Jinja
``chat_template`` in ``tokenizer_config.json`` (what ``transformers``' ``apply_chat_template`` renders):

    {system}\\n\\n### User:\\n{user}\\n\\n### Assistant:\\n{assistant}<eos>### User:\\n...

Conversations are tokenized segment by segment (each message's text on its own), so assistant spans are
exact token ranges; each becomes one row of ``data.seq_len + 1`` tokens, cut at the end or padded.
Malformed lines are counted by reason, skipped and reported.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fmforge.data.loader import GlobalBatchLoader
from fmforge.data.records import IGNORE_INDEX, read_jsonl, report_dropped
from fmforge.data.tokenizer import load_tokenizer
from fmforge.errors import FmforgeError

ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}\n\n### Assistant:\n"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def segments(messages: list[dict]) -> list[tuple[str, bool]]:
    """The template as (text, is_assistant) pieces; an assistant piece is followed by end-of-text."""
    out = []
    for m in messages:
        if m["role"] == "system":
            out.append((f"{m['content']}\n\n", False))
        elif m["role"] == "user":
            out.append((f"### User:\n{m['content']}\n\n### Assistant:\n", False))
        else:
            out.append((m["content"], True))
    return out


def _problem(record) -> str | None:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        return "no_messages"
    for m in record["messages"]:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return "bad_role"
        if not isinstance(m.get("content"), str) or not m["content"]:
            return "empty_content"
    if not any(m["role"] == "assistant" for m in record["messages"]):
        return "no_assistant_message"
    return None


def read_chats(path: Path) -> tuple[list[list[dict]], Counter]:
    """Every well-formed conversation of a chat JSONL file, and the dropped lines counted by reason."""
    records, dropped = read_jsonl(path, _problem, 'chat {"messages": [...]} lines')
    return [r["messages"] for r in records], dropped


def encode_chat(tokenizer, messages: list[dict], length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of ``length`` tokens: [bos] + the segments' tokens, labels = ids on assistant tokens
    (and their end-of-text) and -100 elsewhere; cut at ``length`` or padded with pad/-100."""
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    labels = [IGNORE_INDEX] * len(ids)
    for text, is_assistant in segments(messages):
        toks = tokenizer.encode(text) + ([tokenizer.eos_id] if is_assistant else [])
        ids += toks
        labels += toks if is_assistant else [IGNORE_INDEX] * len(toks)
    ids, labels = ids[:length], labels[:length]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    n = len(ids)
    return (np.array(ids + [pad] * (length - n), dtype=np.int64),
            np.array(labels + [IGNORE_INDEX] * (length - n), dtype=np.int64))


class ChatRows:
    """Tokenized conversations as rows of ``seq_len + 1`` (ids and labels), split train/val by a hash of
    each conversation (the same conversation always lands in the same split)."""

    def __init__(self, path: Path, tokenizer, seq_len: int, split: str, val_fraction: float = 0.05, echo=print):
        chats, dropped = read_chats(path)
        rows, labels = [], []
        for messages in chats:
            digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
            in_val = int.from_bytes(digest[:8], "big") / 2**64 < val_fraction
            if in_val != (split == "val"):
                continue
            ids, lab = encode_chat(tokenizer, messages, seq_len + 1)
            if (lab[1:] == IGNORE_INDEX).all():
                dropped["assistant_cut_off"] += 1  # the reply starts beyond seq_len: nothing to learn from
                continue
            rows.append(ids)
            labels.append(lab)
        if split == "train":
            report_dropped(echo, path, dropped, "conversation(s)")
        if not rows:
            raise FmforgeError(f"no usable {split} conversations in {path}")
        self.seq_len = seq_len
        self.data = torch.from_numpy(np.stack([np.stack(rows), np.stack(labels)], axis=1))  # [N, 2, T+1]

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, indices) -> torch.Tensor:
        return self.data[torch.as_tensor(np.asarray(indices), dtype=torch.long)]


class ChatBatchLoader(GlobalBatchLoader):
    """The token loader's deterministic, resumable order over conversation rows; targets are the labels."""

    what = "conversations"

    @staticmethod
    def inputs_targets(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rows[:, 0, :-1], rows[:, 1, 1:]


def write_chat_template(run_dir: Path) -> None:
    """Put the chat template (and the special tokens) into the run's tokenizer_config.json."""
    path = run_dir / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    tok = load_tokenizer(run_dir / "tokenizer.json")
    config.update({"tokenizer_class": config.get("tokenizer_class", "PreTrainedTokenizerFast"),
                   **tok.special_tokens_map(), "chat_template": CHAT_TEMPLATE})
    path.write_text(json.dumps(config, indent=2) + "\n")
