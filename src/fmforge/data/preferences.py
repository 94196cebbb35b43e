"""Preference JSONL for DPO (``objectives/dpo.py``): one comparison per line,
``{"prompt": "...", "chosen": "...", "rejected": "..."}``, prompt and replies in the chat template of
``chat.py``. Malformed lines are counted by reason, skipped and reported."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fmforge.data.chat import encode_chat
from fmforge.data.loader import GlobalBatchLoader
from fmforge.data.records import IGNORE_INDEX, read_jsonl, report_dropped
from fmforge.errors import FmforgeError


def _problem(record) -> str | None:
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) and record[k]
                                               for k in ("prompt", "chosen", "rejected")):
        return "missing_field"
    return "chosen_equals_rejected" if record["chosen"] == record["rejected"] else None


def read_preferences(path: Path) -> tuple[list[dict], Counter]:
    """Well-formed comparisons of a preference JSONL file and the dropped lines counted by reason."""
    return read_jsonl(path, _problem, 'preference {"prompt": ..., "chosen": ..., "rejected": ...} lines')


class PreferenceRows:
    """Tokenized comparisons [N, 2 (chosen, rejected), 2 (ids, labels), T+1] of one split (by a hash of
    the prompt, so every comparison of one prompt lands in the same split). ``reference`` [N, 2] holds the
    reference model's log-probabilities of each reply, filled in by the DPO objective before training."""

    def __init__(self, path: Path, tokenizer, seq_len: int, split: str, val_fraction=0.05, echo=print):
        pairs, dropped = read_preferences(path)
        rows = []
        for p in pairs:
            digest = hashlib.sha256(p["prompt"].encode()).digest()
            if (int.from_bytes(digest[:8], "big") / 2**64 < val_fraction) != (split == "val"):
                continue
            both = [encode_chat(tokenizer, [{"role": "user", "content": p["prompt"]},
                                            {"role": "assistant", "content": p[k]}], seq_len + 1)
                    for k in ("chosen", "rejected")]
            if any((labels[1:] == IGNORE_INDEX).all() for _, labels in both):
                dropped["reply_cut_off"] += 1
                continue
            rows.append(np.stack([np.stack(pair) for pair in both]))
        if split == "train":
            report_dropped(echo, path, dropped, "comparison(s)")
        if not rows:
            raise FmforgeError(f"no usable {split} comparisons in {path}")
        self.tokens = torch.from_numpy(np.stack(rows))
        self.reference = torch.zeros(len(self.tokens), 2)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return self.tokens[index], self.reference[index]


class PreferenceBatchLoader(GlobalBatchLoader):
    """The token loader's deterministic, resumable order over comparisons; a micro-batch is
    (tokens [n, 2, 2, T+1], reference log-probs [n, 2])."""

    what = "comparisons"

    @staticmethod
    def inputs_targets(rows):
        return rows
