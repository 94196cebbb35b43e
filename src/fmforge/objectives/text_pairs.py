"""Contrastive fine-tuning of a BERT-family encoder on (query, passage) pairs (``finetune.task=pairs``): the
sentence-transformers recipe for retrieval. Both texts are embedded by the mean of the final hidden states
over their real tokens, L2-normalized (``mean_pool``, the same pooling ``fmforge rag`` indexes with), and
each query must pick its own passage among every passage of the micro-batch (in-batch negatives:
InfoNCE / MultipleNegativesRankingLoss with scale 20, i.e. temperature 0.05; Henderson et al. 2017, Karpukhin
et al. 2020). Negatives come from the micro-batch, so a larger micro-batch is a harder task.

Data at ``data.path``: JSONL lines ``{"query": ..., "passage": ...}``; other lines are counted and skipped.
Validation: the loss, and recall@1 of each held-out query against every held-out passage (split by a hash of
the query, so a question's pair is never on both sides).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fmforge.config import Config
from fmforge.data.loader import GlobalBatchLoader
from fmforge.data.records import read_jsonl, report_dropped
from fmforge.errors import FmforgeError
from fmforge.models.bert import Bert
from fmforge.objectives.base import Sums, Task, encoder_flops, evaluating, finetune_rows

SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss default


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unit sentence embeddings [B, d]: the mean of ``hidden`` [B, T, d] over the positions ``mask`` keeps."""
    m = mask[..., None].to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def in_batch_loss(queries: torch.Tensor, passages: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
    """Cross-entropy of each query's similarity to its own passage against every passage of the batch."""
    logits = scale * queries.float() @ passages.float().T
    return F.cross_entropy(logits, torch.arange(len(queries), device=logits.device))


def _problem(record) -> str | None:
    if not isinstance(record, dict):
        return "not_an_object"
    for key in ("query", "passage"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            return f"missing_{key}"
    return None


def encode_rows(tokenizer, texts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] tokens [SEP]`` rows cut or padded to ``seq_len``, and their attention masks."""
    vocab = tokenizer.tokenizer
    start = vocab.token_to_id("[CLS]") if vocab.token_to_id("[CLS]") is not None else tokenizer.bos_id
    end = vocab.token_to_id("[SEP]") if vocab.token_to_id("[SEP]") is not None else tokenizer.eos_id
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ids = torch.full((len(texts), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(texts), seq_len), dtype=torch.long)
    for i, toks in enumerate(tokenizer.encode_batch(texts)):
        row = (([start] if start is not None else []) + toks[: seq_len - 2] + [end])[:seq_len]
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


class PairRows:
    """One split's (query, passage) pairs as token rows with masks."""

    def __init__(self, path: Path, tokenizer, seq_len: int, split: str, val_fraction: float, echo=print):
        records, dropped = read_jsonl(Path(path), _problem, 'pairs ({"query": ..., "passage": ...})')
        if split == "train":
            report_dropped(echo, Path(path), dropped, "line(s)")
        keep = []
        for r in records:
            digest = hashlib.sha256(r["query"].encode()).digest()
            if (int.from_bytes(digest[:8], "big") / 2**64 < val_fraction) == (split == "val"):
                keep.append(r)
        if len(keep) < 2:
            raise FmforgeError(f"{path} has {len(keep)} {split} pair(s): contrastive training needs at least 2")
        self.q_ids, self.q_mask = encode_rows(tokenizer, [r["query"] for r in keep], seq_len)
        self.p_ids, self.p_mask = encode_rows(tokenizer, [r["passage"] for r in keep], seq_len)

    def __len__(self) -> int:
        return len(self.q_ids)

    def batch(self, indices):
        i = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return self.q_ids[i], self.q_mask[i], self.p_ids[i], self.p_mask[i]


class PairBatchLoader(GlobalBatchLoader):
    what = "pairs"

    @staticmethod
    def inputs_targets(rows):
        q_ids, q_mask, p_ids, p_mask = rows
        return (q_ids, q_mask), (p_ids, p_mask)


class TextPairsTask(Task):
    unit = "samples"
    default_global_batch = 32

    def __init__(self, cfg: Config, data_dir: Path, echo):
        super().__init__(cfg, data_dir, echo)
        if cfg.data.seq_len > cfg.model.max_seq_len:
            raise FmforgeError(f"data.seq_len ({cfg.data.seq_len}) exceeds the base's max_seq_len "
                               f"({cfg.model.max_seq_len})")
        _, self.train_rows, self.val_rows = finetune_rows(self, PairRows, "pairs")
        self.global_batch = cfg.train.global_batch or self.default_global_batch

    def make_loader(self, micro_batch: int, rank: int, world_size: int):
        return PairBatchLoader(self.train_rows, self.global_batch, micro_batch, self.cfg.train.seed,
                               rank=rank, world_size=world_size)

    def build_model(self) -> nn.Module:
        return Bert(self.model_cfg)

    def flops_per_unit(self, model: nn.Module) -> float:
        m = self.model_cfg
        return 2 * encoder_flops(model.blocks, self.cfg.data.seq_len, m.n_layer, m.d_model)

    def batch_description(self, loader, dp_size: int) -> str:
        return (f"global batch {self.global_batch} pairs = {loader.accum_steps} x {loader.micro_batch} x {dp_size}; "
                f"{loader.micro_batch - 1} in-batch negatives per query")

    def embed(self, model, ids, mask, device, amp) -> torch.Tensor:
        ids, mask = ids.to(device), mask.to(device)
        with amp():
            hidden = model(ids, mask)
        return mean_pool(hidden.float(), mask)

    def loss(self, model, batch, device, amp):
        (q_ids, q_mask), (p_ids, p_mask) = batch
        return in_batch_loss(self.embed(model, q_ids, q_mask, device, amp),
                             self.embed(model, p_ids, p_mask, device, amp))

    def validate(self, model, micro_batch, device, amp):
        if self.val_rows is None:
            return None
        sums, queries, passages = Sums(), [], []
        n = len(self.val_rows)
        with evaluating(model):
            for start in range(0, n, micro_batch):
                q_ids, q_mask, p_ids, p_mask = self.val_rows.batch(range(start, min(start + micro_batch, n)))
                q, p = self.embed(model, q_ids, q_mask, device, amp), self.embed(model, p_ids, p_mask, device, amp)
                if len(q) > 1:
                    sums.add("val_loss", in_batch_loss(q, p).item() * len(q), len(q))
                queries.append(q)
                passages.append(p)
        q, p = torch.cat(queries), torch.cat(passages)
        hits = ((q @ p.T).argmax(-1) == torch.arange(n, device=q.device)).sum().item()
        sums.add("val_recall_at_1", hits, n)
        return sums.means()
