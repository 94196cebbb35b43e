"""Sequence classification (``finetune.task=classify``) of a BERT-family encoder on labelled text at
``data.path`` (``data/labelled.py``): a [CLS] pooler + classifier head (new, randomly initialized) on the
base's encoder. The global batch counts sequences."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn
import torch.nn.functional as F

from fmforge.config import Config
from fmforge.data.labelled import LabelledBatchLoader, LabelledRows
from fmforge.errors import FmforgeError
from fmforge.models.bert import Bert
from fmforge.objectives.base import Sums, Task, encoder_flops, evaluating, finetune_rows
from fmforge.objectives.image_classify import classification_loss


class TextClassificationTask(Task):
    unit = "samples"
    default_global_batch = 256

    def __init__(self, cfg: Config, data_dir: Path, echo):
        super().__init__(cfg, data_dir, echo)
        _, self.train_rows, self.val_rows = finetune_rows(self, LabelledRows, "examples")
        seq_len = cfg.data.seq_len
        m = cfg.model
        if seq_len > m.max_seq_len:
            raise FmforgeError(f"data.seq_len ({seq_len}) exceeds the base's max_seq_len ({m.max_seq_len})")
        self.model_cfg = type(m)(**{**m.model_dump(), "num_labels": len(self.train_rows.classes)})
        self.global_batch = cfg.train.global_batch or self.default_global_batch

    def make_loader(self, micro_batch: int, rank: int, world_size: int):
        return LabelledBatchLoader(self.train_rows, self.global_batch, micro_batch, self.cfg.train.seed,
                                   rank=rank, world_size=world_size)

    def build_model(self) -> nn.Module:
        return Bert(self.model_cfg)

    def flops_per_unit(self, model: nn.Module) -> float:
        m = self.model_cfg
        return encoder_flops(model.blocks, self.cfg.data.seq_len, m.n_layer, m.d_model)

    def batch_description(self, loader, dp_size: int) -> str:
        return (f"global batch {self.global_batch} sentences = {loader.accum_steps} x {loader.micro_batch} x "
                f"{dp_size}, {len(self.train_rows.classes)} classes")

    def loss(self, model, batch, device, amp):
        (ids, mask), labels = batch
        with amp():
            logits = model(ids.to(device), mask.to(device), classify=True)
        return classification_loss(logits, labels.to(device))

    def validate(self, model, micro_batch, device, amp):
        if self.val_rows is None:
            return None
        sums = Sums()
        n = len(self.val_rows)
        with evaluating(model):
            for start in range(0, n, micro_batch):
                ids, mask, labels = self.val_rows.batch(range(start, min(start + micro_batch, n)))
                with amp():
                    logits = model(ids.to(device), mask.to(device), classify=True).float()
                labels = labels.to(device)
                sums.add("val_loss", F.cross_entropy(logits, labels, reduction="sum").item(), len(labels))
                sums.add("val_accuracy", int((logits.argmax(-1) == labels).sum()), len(labels))
        return {**sums.means(), "val_majority_baseline": self.val_rows.majority()}
