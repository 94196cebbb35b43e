"""Instruction SFT (``finetune.task=sft``) for decoders: chat JSONL at ``data.path`` (``data/chat.py``),
tokenized with the base model's tokenizer, one conversation per row, loss on assistant tokens only. The
global batch counts conversations. The final model ships the chat template in tokenizer_config.json."""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F

from fmforge.config import Config
from fmforge.data.chat import ChatBatchLoader, ChatRows
from fmforge.data.records import IGNORE_INDEX
from fmforge.objectives.base import Sums, evaluating, finetune_rows
from fmforge.objectives.clm import DecoderTask


class SFTTask(DecoderTask):
    unit = "samples"
    batch_noun = "conversations"
    chat_template = True
    default_global_batch = 256

    def __init__(self, cfg: Config, data_dir: Path, echo):
        super().__init__(cfg, data_dir, echo)
        tok, self.train_rows, self.val_rows = finetune_rows(self, ChatRows, "conversations")
        seq_len = cfg.data.seq_len
        self.model_cfg = cfg.model.resolved(vocab_size=tok.vocab_size, seq_len=seq_len)
        self.global_batch = cfg.train.global_batch or self.default_global_batch

    def flops_per_unit(self, model) -> float:
        return model.flops_per_token(self.cfg.data.seq_len) * self.cfg.data.seq_len

    def make_loader(self, micro_batch: int, rank: int, world_size: int):
        return ChatBatchLoader(self.train_rows, self.global_batch, micro_batch, self.cfg.train.seed, rank=rank,
                               world_size=world_size)

    def validate(self, model, micro_batch, device, amp):
        if self.val_rows is None:
            return None
        sums = Sums()
        with evaluating(model):
            for start in range(0, len(self.val_rows), micro_batch):
                rows = self.val_rows.batch(range(start, min(start + micro_batch, len(self.val_rows))))
                inputs, targets = (t.to(device) for t in ChatBatchLoader.inputs_targets(rows))
                with amp():
                    logits = model(inputs)
                mask = targets != IGNORE_INDEX
                sums.add("val_loss", F.cross_entropy(logits.float()[mask], targets[mask], reduction="sum").item(),
                         int(mask.sum()))
        return sums.means()
