"""The fine-tuning tasks for the one training loop (see ``train/tasks.py``): instruction SFT and DPO for
decoders, sequence classification for BERT-family encoders. Their data is raw JSONL (or fastText lines)
read at start-up with the base model's tokenizer, not prepared shards.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmforge.config import Config
from fmforge.errors import FmforgeError
from fmforge.train.tasks import CausalLMTask, Task, encoder_flops, evaluating


def base_tokenizer(task: Task, cfg: Config):
    """The tokenizer of ``finetune.base``, which these tasks need (their data is raw text, not shards)."""
    from fmforge.data.tokenizer import load_tokenizer

    if not cfg.finetune.base:
        raise FmforgeError(f"finetune.task={cfg.finetune.task} fine-tunes a model: set finetune.base (or pass --base)")
    task.tokenizer_dir = Path(cfg.finetune.base)
    return load_tokenizer(task.tokenizer_dir / "tokenizer.json")


def split_rows(make, what: str, data_dir: Path, echo):
    """(train rows, val rows or None): ``make(split)`` builds one split's rows."""
    train = make("train")
    try:
        return train, make("val")
    except FmforgeError:
        echo(f"warning: no validation: {data_dir} has too few {what} for finetune.val_fraction")
        return train, None


def check_batch(cfg: Config) -> None:
    if cfg.train.global_batch_tokens % cfg.data.seq_len:
        raise FmforgeError(f"train.global_batch_tokens ({cfg.train.global_batch_tokens}) must be a multiple "
                           f"of data.seq_len ({cfg.data.seq_len})")


class SFTTask(CausalLMTask):
    """Instruction SFT: chat JSONL at ``data.path`` (``finetune/sft.py``), tokenized with the base model's
    tokenizer, one conversation per row, loss on assistant tokens only. The global batch counts
    conversations: ``train.global_batch_tokens / data.seq_len`` rows per step."""

    def __init__(self, cfg: Config, data_dir: Path, echo):
        from fmforge.finetune.sft import ChatRows

        Task.__init__(self, cfg, data_dir, echo)
        tok = base_tokenizer(self, cfg)
        seq_len, frac = cfg.data.seq_len, cfg.finetune.val_fraction
        self.train_windows, self.val_windows = split_rows(
            lambda split: ChatRows(data_dir, tok, seq_len, split, frac, echo=echo), "conversations", data_dir, echo)
        cfg.model = cfg.model.resolved(vocab_size=tok.vocab_size, seq_len=seq_len)
        check_batch(cfg)
        self.units_per_step = cfg.train.global_batch_tokens

    def make_loader(self, micro_batch: int, rank: int, world_size: int):
        from fmforge.finetune.sft import ChatBatchLoader

        return ChatBatchLoader(self.train_windows, self.units_per_step // self.cfg.data.seq_len, micro_batch,
                               self.cfg.train.seed, rank=rank, world_size=world_size)

    def validate(self, model, micro_batch, device, amp):
        from fmforge.finetune.sft import ChatBatchLoader
        from fmforge.objectives.clm import IGNORE_INDEX

        if self.val_windows is None:
            return None
        total = count = 0.0
        with evaluating(model):
            for start in range(0, len(self.val_windows), micro_batch):
                rows = self.val_windows.batch(range(start, min(start + micro_batch, len(self.val_windows))))
                inputs, targets = (t.to(device) for t in ChatBatchLoader.inputs_targets(rows))
                with amp():
                    logits = model(inputs)
                mask = targets != IGNORE_INDEX
                total += F.cross_entropy(logits.float()[mask], targets[mask], reduction="sum").item()
                count += int(mask.sum())
        return {"val_loss": total / max(count, 1)}

    def save_pretrained(self, state_dict: dict, run_dir: Path) -> None:
        from fmforge.finetune.sft import write_chat_template

        super().save_pretrained(state_dict, run_dir)
        write_chat_template(run_dir)


class DPOTask(SFTTask):
    """Direct preference optimization on preference JSONL at ``data.path`` (``finetune/dpo.py``), the base
    model as frozen reference (its log-probabilities computed once, here). The global batch counts
    comparisons: ``train.global_batch_tokens / data.seq_len`` per step."""

    def __init__(self, cfg: Config, data_dir: Path, echo):
        from fmforge.device import pick_device
        from fmforge.finetune.dpo import PreferenceRows
        from fmforge.runs import load_pretrained

        Task.__init__(self, cfg, data_dir, echo)
        tok = base_tokenizer(self, cfg)
        device = pick_device(cfg.train.device)
        reference, _ = load_pretrained(self.tokenizer_dir, device, family="decoder")  # freed after __init__
        seq_len, frac = cfg.data.seq_len, cfg.finetune.val_fraction
        self.train_windows, self.val_windows = split_rows(
            lambda split: PreferenceRows(data_dir, tok, seq_len, split, reference, device, frac, echo=echo),
            "comparisons", data_dir, echo)
        cfg.model = cfg.model.resolved(vocab_size=tok.vocab_size, seq_len=seq_len)
        check_batch(cfg)
        self.units_per_step = cfg.train.global_batch_tokens

    def make_loader(self, micro_batch: int, rank: int, world_size: int):
        from fmforge.finetune.dpo import PreferenceBatchLoader

        return PreferenceBatchLoader(self.train_windows, self.units_per_step // self.cfg.data.seq_len, micro_batch,
                                     self.cfg.train.seed, rank=rank, world_size=world_size)

    def loss(self, model, batch, device, amp):
        from fmforge.finetune.dpo import dpo_loss, policy_logps

        tokens, reference = (t.to(device, non_blocking=True) for t in batch)
        with amp():
            policy = policy_logps(model, tokens)
        return dpo_loss(policy, reference, self.cfg.finetune.dpo_beta)[0]

    def validate(self, model, micro_batch, device, amp):
        from fmforge.finetune.dpo import dpo_loss, policy_logps

        if self.val_windows is None:
            return None
        losses, margins = [], []
        with evaluating(model):
            for start in range(0, len(self.val_windows), micro_batch):
                tokens, reference = self.val_windows.batch(range(start, min(start + micro_batch, len(self.val_windows))))
                with amp():
                    policy = policy_logps(model, tokens.to(device))
                loss, margin = dpo_loss(policy, reference.to(device), self.cfg.finetune.dpo_beta)
                losses.append(loss.item() * len(tokens))
                margins.append(margin.cpu())
        margin = torch.cat(margins)
        return {"val_loss": sum(losses) / len(margin), "val_reward_margin": margin.mean().item(),
                "val_reward_accuracy": (margin > 0).float().mean().item()}


class TextClassificationTask(Task):
    """Sequence classification fine-tuning of a BERT-family encoder on labelled text at ``data.path``
    (``finetune/classify.py``): a [CLS] pooler + classifier head (new, randomly initialized) on the base's
    encoder. The global batch counts sentences: ``train.global_batch_tokens / data.seq_len`` per step."""

    unit = "samples"

    def __init__(self, cfg: Config, data_dir: Path, echo):
        from fmforge.finetune.classify import LabelledRows

        super().__init__(cfg, data_dir, echo)
        tok = base_tokenizer(self, cfg)
        seq_len, frac = cfg.data.seq_len, cfg.finetune.val_fraction
        self.train_rows, self.val_rows = split_rows(
            lambda split: LabelledRows(data_dir, tok, seq_len, split, frac, echo=echo), "examples", data_dir, echo)
        m = cfg.model
        if seq_len > m.max_seq_len:
            raise FmforgeError(f"data.seq_len ({seq_len}) exceeds the base's max_seq_len ({m.max_seq_len})")
        cfg.model = type(m)(**{**m.model_dump(), "num_labels": len(self.train_rows.classes)})
        check_batch(cfg)
        self.units_per_step = cfg.train.global_batch_tokens // seq_len

    def make_loader(self, micro_batch: int, rank: int, world_size: int):
        from fmforge.finetune.classify import LabelledBatchLoader

        return LabelledBatchLoader(self.train_rows, self.units_per_step, micro_batch, self.cfg.train.seed,
                                   rank=rank, world_size=world_size)

    def build_model(self) -> nn.Module:
        from fmforge.models.bert import Bert

        return Bert(self.cfg.model)

    def flops_per_unit(self, model: nn.Module) -> float:
        m = self.cfg.model
        return encoder_flops(model, self.cfg.data.seq_len, m.n_layer, m.d_model)

    def batch_description(self, loader, dp_size: int) -> str:
        return (f"global batch {self.units_per_step} sentences = {loader.accum_steps} x {loader.micro_batch} x "
                f"{dp_size}, {len(self.train_rows.classes)} classes")

    def loss(self, model, batch, device, amp):
        from fmforge.objectives.classify import classification_loss

        (ids, mask), labels = batch
        with amp():
            logits = model(ids.to(device), mask.to(device), classify=True)
        return classification_loss(logits, labels.to(device))

    def validate(self, model, micro_batch, device, amp):
        if self.val_rows is None:
            return None
        total, correct = 0.0, 0
        with evaluating(model):
            for start in range(0, len(self.val_rows), micro_batch):
                ids, mask, labels = self.val_rows.batch(range(start, min(start + micro_batch, len(self.val_rows))))
                with amp():
                    logits = model(ids.to(device), mask.to(device), classify=True).float()
                labels = labels.to(device)
                total += F.cross_entropy(logits, labels, reduction="sum").item()
                correct += int((logits.argmax(-1) == labels).sum())
        n = len(self.val_rows)
        return {"val_loss": total / n, "val_accuracy": correct / n, "val_majority_baseline": self.val_rows.majority()}
