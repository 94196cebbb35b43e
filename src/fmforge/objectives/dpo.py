"""Direct Preference Optimization (Rafailov et al. 2023) on preference JSONL: one line per comparison,
``{"prompt": "...", "chosen": "...", "rejected": "..."}``.

The policy starts from the base model and learns to raise the log-likelihood ratio of the chosen reply over
the rejected one, relative to a frozen reference (the base itself):

    loss = -log sigmoid(beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))))

Data: ``data/preferences.py``; prompt and replies use the SFT chat template (``data/chat.py``); log-probabilities sum over the reply tokens and
their end-of-text. The reference's log-probabilities are computed once, before training, from the base
model (TRL's ``precompute_ref_log_probs``): no second model is held in memory while training, and the
reference cannot change.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fmforge.config import Config
from fmforge.data.preferences import PreferenceBatchLoader, PreferenceRows
from fmforge.data.records import IGNORE_INDEX
from fmforge.device import pick_device
from fmforge.objectives.base import evaluating, finetune_rows
from fmforge.objectives.clm import DecoderTask
from fmforge.runs import load_pretrained


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


def policy_logps(model, tokens: torch.Tensor) -> torch.Tensor:
    """The policy's log-probs [n, 2] of the chosen and rejected replies, in one forward pass."""
    flat = tokens.flatten(0, 1)
    return sequence_logps(model, flat[:, 0], flat[:, 1]).view(-1, 2)


@torch.no_grad()
def reference_logps(model, tokens: torch.Tensor, device, batch_size: int = 32) -> torch.Tensor:
    """The reference model's log-probs [N, 2] of the chosen and rejected replies of every comparison."""
    out = []
    for start in range(0, len(tokens), batch_size):
        out.append(policy_logps(model, tokens[start:start + batch_size].to(device)).cpu())
    return torch.cat(out)


class DPOTask(DecoderTask):
    """DPO (``finetune.task=dpo``) against the frozen base as reference; the global batch counts comparisons."""

    unit = "samples"
    batch_noun = "comparisons"
    chat_template = True  # prompts and replies were read in the chat template
    default_global_batch = 256

    def __init__(self, cfg: Config, data_dir: Path, echo):
        super().__init__(cfg, data_dir, echo)
        tok, self.train_rows, self.val_rows = finetune_rows(self, PreferenceRows, "comparisons")
        seq_len = cfg.data.seq_len
        device = pick_device(cfg.train.device)
        reference, _ = load_pretrained(self.tokenizer_dir, device, family="decoder")  # freed after __init__
        for rows in (self.train_rows, self.val_rows):
            if rows is not None:
                rows.reference = reference_logps(reference, rows.tokens, device)
        self.model_cfg = cfg.model.resolved(vocab_size=tok.vocab_size, seq_len=seq_len)
        self.global_batch = cfg.train.global_batch or self.default_global_batch

    def flops_per_unit(self, model) -> float:
        return 2 * model.flops_per_token(self.cfg.data.seq_len) * self.cfg.data.seq_len  # chosen and rejected

    def make_loader(self, micro_batch: int, rank: int, world_size: int):
        return PreferenceBatchLoader(self.train_rows, self.global_batch, micro_batch, self.cfg.train.seed, rank=rank,
                                     world_size=world_size)

    def loss(self, model, batch, device, amp):
        tokens, reference = (t.to(device, non_blocking=True) for t in batch)
        with amp():
            policy = policy_logps(model, tokens)
        return dpo_loss(policy, reference, self.cfg.finetune.dpo_beta)[0]

    def validate(self, model, micro_batch, device, amp):
        if self.val_rows is None:
            return None
        losses, margins = [], []
        with evaluating(model):
            for start in range(0, len(self.val_rows), micro_batch):
                tokens, reference = self.val_rows.batch(range(start, min(start + micro_batch, len(self.val_rows))))
                with amp():
                    policy = policy_logps(model, tokens.to(device))
                loss, margin = dpo_loss(policy, reference.to(device), self.cfg.finetune.dpo_beta)
                losses.append(loss.item() * len(tokens))
                margins.append(margin.cpu())
        margin = torch.cat(margins)
        return {"val_loss": sum(losses) / len(margin), "val_reward_margin": margin.mean().item(),
                "val_reward_accuracy": (margin > 0).float().mean().item()}
