"""Labelled text for sequence classification (``objectives/text_classify.py``): JSONL lines ``{"text": ..., "label": ...}`` or fastText lines ``__label__NAME text`` (the format of
gensim's bundled ``pang_lee_polarity.cor``: 200 movie-review sentences, positive or negative). Each text
becomes ``[CLS] tokens [SEP]`` (``bos``/``eos`` for tokenizers without them), cut or padded to
``data.seq_len`` with an attention mask. The split is by a hash of the text, so it never depends on order.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fmforge.data.limits import MAX_RECORD_LINE_BYTES
from fmforge.data.loader import GlobalBatchLoader
from fmforge.data.records import report_dropped, text_lines
from fmforge.errors import FmforgeError

FASTTEXT_LABEL = "__label__"


def pang_lee_polarity() -> Path:
    """gensim's bundled labelled sentences (``pip install gensim``); located without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / "test" / "test_data" / "pang_lee_polarity.cor" if folders else None
    if path is None or not path.is_file():
        raise FmforgeError("gensim's pang_lee_polarity.cor is not installed: pip install gensim")
    return path


def read_labelled(path: Path, max_line_bytes: int = MAX_RECORD_LINE_BYTES) -> tuple[list[tuple[str, str]], Counter]:
    """(text, label) pairs of a JSONL or fastText file, and the dropped lines counted by reason (lines
    longer than ``max_line_bytes`` as ``line_too_long``)."""
    if not path.is_file():
        raise FmforgeError(f"labelled data not found: {path} (.jsonl of {{\"text\", \"label\"}} or fastText lines)")
    pairs, dropped = [], Counter()
    for line in text_lines(path, dropped, max_line_bytes):
        line = line.strip()
        if line.startswith(FASTTEXT_LABEL):
            label, _, text = line[len(FASTTEXT_LABEL):].partition(" ")
        else:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                dropped["invalid_line"] += 1
                continue
            if not isinstance(record, dict):
                dropped["invalid_line"] += 1
                continue
            text, label = record.get("text"), record.get("label")
            label = str(label) if isinstance(label, (str, int)) and not isinstance(label, bool) else None
        if not isinstance(text, str) or not text.strip():
            dropped["missing_text"] += 1
        elif not label:
            dropped["missing_label"] += 1
        else:
            pairs.append((text.strip(), label))
    return pairs, dropped


class LabelledRows:
    """One split's texts as fixed-length token rows with attention masks, and their class indices."""

    def __init__(self, path: Path, tokenizer, seq_len: int, split: str, val_fraction: float, echo=print):
        pairs, dropped = read_labelled(path)
        if split == "train":
            report_dropped(echo, path, dropped, "line(s)")
        names = sorted({label for _, label in pairs})
        self.classes = sorted(names, key=int) if all(n.lstrip("-").isdigit() for n in names) else names
        if len(self.classes) < 2:
            raise FmforgeError(f"{path} has {len(self.classes)} class(es); classification needs at least 2")
        vocab = tokenizer.tokenizer
        start = vocab.token_to_id("[CLS]") if vocab.token_to_id("[CLS]") is not None else tokenizer.bos_id
        end = vocab.token_to_id("[SEP]") if vocab.token_to_id("[SEP]") is not None else tokenizer.eos_id
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        ids, masks, labels = [], [], []
        for text, label in pairs:
            digest = hashlib.sha256(text.encode()).digest()
            if (int.from_bytes(digest[:8], "big") / 2**64 < val_fraction) != (split == "val"):
                continue
            toks = ([start] if start is not None else []) + tokenizer.encode(text)[: seq_len - 2] + [end]
            toks = toks[:seq_len]
            ids.append(toks + [pad] * (seq_len - len(toks)))
            masks.append([1] * len(toks) + [0] * (seq_len - len(toks)))
            labels.append(self.classes.index(label))
        if not ids:
            raise FmforgeError(f"no {split} examples in {path}")
        self.ids, self.mask = torch.tensor(ids), torch.tensor(masks)
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices):
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return self.ids[index], self.mask[index], self.labels[index]

    def majority(self) -> float:
        """Accuracy of always answering the most frequent class: the baseline to beat."""
        return torch.bincount(self.labels).max().item() / len(self.labels)


class LabelledBatchLoader(GlobalBatchLoader):
    """The token loader's deterministic, resumable order over labelled rows: ((ids, mask), labels)."""

    what = "sequences"

    @staticmethod
    def inputs_targets(rows):
        ids, mask, labels = rows
        return (ids, mask), labels
