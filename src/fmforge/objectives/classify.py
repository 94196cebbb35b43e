"""Classification: cross-entropy for training, top-k accuracy for evaluation (images or [CLS] sequences)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of logits [B, C] against class indices [B], in fp32."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """How many rows have their label among the k highest logits, as a tensor so ranks can all-reduce it
    before dividing (averaging per-rank accuracies is wrong when the last batch is short). k is capped
    at the number of classes."""
    k = min(k, logits.size(-1))
    top = logits.topk(k, dim=-1).indices
    return (top == labels[:, None]).any(dim=-1).sum()


def accuracy(logits: torch.Tensor, labels: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> tuple[float, ...]:
    """Top-k accuracies in [0, 1], one per k in ``topk``."""
    return tuple(topk_correct(logits, labels, k).item() / labels.numel() for k in topk)
