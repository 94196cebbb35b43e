"""Causal language modelling (gpt2, llama): predict token t+1 from tokens <= t, on packed token windows."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fmforge.config import DEFAULT_GLOBAL_BATCH_TOKENS, Config
from fmforge.data.chat import write_chat_template
from fmforge.data.loader import GlobalBatchLoader, TokenWindows, eval_windows
from fmforge.data.records import IGNORE_INDEX
from fmforge.errors import FmforgeError
from fmforge.models.registry import build_model
from fmforge.objectives.base import Task, evaluating

__all__ = ["IGNORE_INDEX", "CausalLMTask", "DecoderTask", "clm_loss", "evaluate_batches"]


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


@torch.no_grad()
def evaluate_batches(model, batches, device: torch.device, amp=contextlib.nullcontext,
                     token_bytes: torch.Tensor | None = None) -> dict:
    """Mean next-token loss (nats) over ``(inputs, targets)`` batches; with ``token_bytes`` also the UTF-8
    byte count of the targets, for bits per byte."""
    total, count, nbytes = 0.0, 0, 0
    with evaluating(model):
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            with amp():
                logits = model(inputs)
            nats = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
            total += nats.item()
            count += targets.numel()
            if token_bytes is not None:
                nbytes += int(token_bytes[targets.cpu()].sum())
    if count == 0:
        raise FmforgeError("nothing to evaluate: the validation split is empty")
    out = {"loss": total / count, "tokens": count, "nats": total}
    if token_bytes is not None:
        out["bytes"] = nbytes
    return out


def check_rows_batch(global_batch: int, seq_len: int, unit: str) -> int:
    """Rows per step of a token-counted global batch."""
    if global_batch % seq_len:
        raise FmforgeError(f"train.global_batch ({global_batch} {unit}) must be a multiple of data.seq_len ({seq_len})")
    return global_batch // seq_len


class DecoderTask(Task):
    """What every decoder objective shares (causal LM, SFT, DPO): the model, its FLOPs, the batch line, the
    next-token loss of a micro-batch ``(inputs, targets)``, and final weights that ship the chat template
    when the objective trained on chats (``chat_template``)."""

    chat_template = False

    def save_pretrained(self, state_dict: dict, run_dir: Path) -> None:
        super().save_pretrained(state_dict, run_dir)
        if self.chat_template:
            write_chat_template(run_dir)

    def build_model(self) -> nn.Module:
        # Compile the loss with the model: the fused chunked cross-entropy is where compile gains most on
        # GPT-2 shapes (H100, 124M: 304k tokens/s eager loss vs 410k compiled).
        self.loss_fn = torch.compile(clm_loss) if self.cfg.train.compile else clm_loss
        return build_model(self.model_cfg)  # a GPT, with virtual tokens under prefix/prompt tuning

    def flops_per_unit(self, model: nn.Module) -> float:
        return model.flops_per_token(self.cfg.data.seq_len)

    def batch_description(self, loader, dp_size: int) -> str:
        shape = f"{loader.accum_steps} x {loader.micro_batch} x {dp_size} rows of {self.cfg.data.seq_len} tokens"
        return f"global batch {self.global_batch} {self.batch_noun} = {shape}"

    def loss(self, model, batch, device, amp):
        inputs, targets = (t.to(device, non_blocking=True) for t in batch)
        with amp():
            logits = model(inputs)
        return self.loss_fn(logits, targets)


class CausalLMTask(DecoderTask):
    """Next-token prediction on the packed token windows of a prepared data directory. The global batch
    counts tokens."""

    default_global_batch = DEFAULT_GLOBAL_BATCH_TOKENS
    batch_noun = "tokens"

    def __init__(self, cfg: Config, data_dir: Path, echo):
        super().__init__(cfg, data_dir, echo)
        seq_len = cfg.data.seq_len
        self.train_windows = TokenWindows(data_dir, "train", seq_len)
        self.tokenizer_dir = data_dir
        self.model_cfg = self.resolve_model(self.train_windows.manifest["tokenizer"])
        self.global_batch = cfg.train.global_batch or self.default_global_batch
        self.rows_per_step = check_rows_batch(self.global_batch, seq_len, "tokens")
        try:
            self.val_windows = TokenWindows(data_dir, "val", seq_len)
        except FmforgeError as err:
            echo(f"warning: no validation: {err}")
            self.val_windows = None

    def resolve_model(self, tok_info: dict):
        return self.cfg.model.resolved(vocab_size=tok_info["vocab_size"], seq_len=self.cfg.data.seq_len)

    def make_loader(self, micro_batch: int, rank: int, world_size: int):
        return GlobalBatchLoader(self.train_windows, self.rows_per_step, micro_batch, self.cfg.train.seed,
                                 rank=rank, world_size=world_size)

    def validate(self, model, micro_batch, device, amp):
        if self.val_windows is None:
            return None
        batches = eval_windows(self.val_windows, micro_batch, self.cfg.train.eval_batches)
        return {"val_loss": evaluate_batches(model, batches, device, amp)["loss"]}
