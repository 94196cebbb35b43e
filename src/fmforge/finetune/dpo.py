"""Direct Preference Optimization (Rafailov et al. 2023) on preference JSONL: one line per comparison,
``{"prompt": "...", "chosen": "...", "rejected": "..."}``.

The policy starts from the base model and learns to raise the log-likelihood ratio of the chosen reply over
the rejected one, relative to a frozen reference (the base itself):

    loss = -log sigmoid(beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))))

Prompt and replies use the SFT chat template (``sft.py``); log-probabilities sum over the reply tokens and
their end-of-text. The reference's log-probabilities are computed once, before training, from the base
model (TRL's ``precompute_ref_log_probs``): no second model is held in memory while training, and the
reference cannot change.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmforge.data.loader import GlobalBatchLoader
from fmforge.errors import FmforgeError
from fmforge.finetune.records import read_jsonl, report_dropped
from fmforge.finetune.sft import encode_chat
from fmforge.objectives.clm import IGNORE_INDEX


def _problem(record) -> str | None:
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) and record[k]
                                               for k in ("prompt", "chosen", "rejected")):
        return "missing_field"
    return "chosen_equals_rejected" if record["chosen"] == record["rejected"] else None


def read_preferences(path: Path) -> tuple[list[dict], Counter]:
    """Well-formed comparisons of a preference JSONL file and the dropped lines counted by reason."""
    return read_jsonl(path, _problem, 'preference {"prompt": ..., "chosen": ..., "rejected": ...} lines')


def sequence_logps(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over each row's labelled positions: ids/labels [n, T+1] -> [n] (fp32)."""
    logits = model(ids[:, :-1]).float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """policy/reference log-probs [n, 2] (chosen, rejected) -> (mean loss, per-pair reward margins)."""
    margin = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    return -F.logsigmoid(margin).mean(), margin.detach()


class PreferenceRows:
    """Tokenized comparisons [N, 2 (chosen, rejected), 2 (ids, labels), T+1] of one split (by a hash of
    the prompt, so every comparison of one prompt lands in the same split), with the reference model's
    log-probabilities [N, 2] computed once."""

    def __init__(self, path: Path, tokenizer, seq_len: int, split: str, reference, device, val_fraction=0.05,
                 batch_size: int = 32, echo=print):
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
        self.reference = self._reference_logps(reference, device, batch_size)

    @torch.no_grad()
    def _reference_logps(self, model, device, batch_size: int) -> torch.Tensor:
        out = []
        for start in range(0, len(self.tokens), batch_size):
            t = self.tokens[start:start + batch_size].to(device)
            flat = t.flatten(0, 1)  # [2b, 2, T+1]
            out.append(sequence_logps(model, flat[:, 0], flat[:, 1]).view(-1, 2).cpu())
        return torch.cat(out)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return self.tokens[index], self.reference[index]


class PreferenceBatchLoader(GlobalBatchLoader):
    """The token loader's deterministic, resumable order over comparisons; a micro-batch is
    (tokens [n, 2, 2, T+1], reference log-probs [n, 2])."""

    @staticmethod
    def inputs_targets(rows):
        return rows


def policy_logps(model, tokens: torch.Tensor) -> torch.Tensor:
    """The policy's log-probs [n, 2] of the chosen and rejected replies, in one forward pass."""
    flat = tokens.flatten(0, 1)
    return sequence_logps(model, flat[:, 0], flat[:, 1]).view(-1, 2)
