"""Causal language modelling: predict token t+1 from tokens <= t."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100


def _chunk_rows(logits: torch.Tensor) -> int:
    # Small fp32 chunks stay in cache on CPU (2 MB); on GPUs chunks only bound memory, so keep them large.
    budget = 2**19 if logits.device.type == "cpu" else 2**27
    return max(1, budget // logits.size(-1))


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over rows whose target is not IGNORE_INDEX, in fp32, a chunk of rows at a time.

    Same value and gradient as ``F.cross_entropy(logits.float(), targets, ignore_index=-100)``, but it never
    holds an fp32 copy of all logits, their log-softmax, or a zero-filled gradient of that size: forward
    keeps one loss per row; backward recomputes each chunk's softmax (upcast inside the kernel), subtracts
    the one-hot target and writes the gradient in the logits' dtype. For bf16 logits over a 50k vocabulary
    that is several GB less memory traffic per step, and on CPU the chunks stay in cache."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        chunk = _chunk_rows(logits)
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, 0)
        target_logp = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.size(0), chunk):
            logp = torch.log_softmax(logits[start:start + chunk], dim=-1, dtype=torch.float32)
            target_logp[start:start + chunk] = logp.gather(1, safe_targets[start:start + chunk, None]).squeeze(1)
        count = valid.sum()
        ctx.save_for_backward(logits, safe_targets, valid, count)
        return -torch.where(valid, target_logp, 0.0).sum() / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        logits, targets, valid, count = ctx.saved_tensors
        chunk = _chunk_rows(logits)
        scale = grad_loss / count * valid  # ignored rows get zero gradient
        grad = torch.empty_like(logits)
        for start in range(0, logits.size(0), chunk):
            end = start + chunk
            probs = torch.softmax(logits[start:end], dim=-1, dtype=torch.float32)
            probs[torch.arange(probs.size(0), device=probs.device), targets[start:end]] -= 1.0
            torch.mul(probs, scale[start:end, None], out=grad[start:end])  # cast to the logits' dtype on write
        return grad, None


def clm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32, over positions whose target is not -100.

    ``logits`` [B, T, V] from the model (any float dtype; the gradient comes back in that dtype);
    ``targets`` [B, T] are the inputs shifted by one (the loader yields both from one T+1 window), so no
    shifted copy of the logits is made.
    """
    return _CrossEntropy.apply(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
