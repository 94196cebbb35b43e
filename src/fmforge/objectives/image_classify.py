"""Image classification (vit, and ViT/MAE bases fine-tuned with ``finetune.task=classify``): cross-entropy
on labelled images, top-k accuracy for evaluation. The loss and top-k helpers serve [CLS] sequence
classification too (``text_classify.py``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmforge.errors import FmforgeError
from fmforge.models.vit import ViT
from fmforge.objectives.base import Sums, encoder_flops, evaluating
from fmforge.objectives.images import ImageTask


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


class ImageClassificationTask(ImageTask):
    needs_mode = "classification"

    @property
    def vision(self):
        return self.model_cfg

    def resolve(self, m):
        classes = len(self.train_shards.classes)
        if "num_classes" in m.model_fields_set and m.num_classes != classes:
            raise FmforgeError(f"model.num_classes ({m.num_classes}) differs from the {classes} classes of "
                               f"{self.data_dir}; leave it unset to take the data's")
        return type(m)(**{**m.model_dump(), "num_classes": classes})

    def build_model(self) -> nn.Module:
        return ViT(self.model_cfg)

    def flops_per_unit(self, model: nn.Module) -> float:
        m = self.model_cfg
        tokens = m.n_prefix + m.num_patches
        patch = m.patch_dim * m.d_model * m.num_patches
        return encoder_flops(model.blocks, tokens, m.n_layer, m.d_model) + 6.0 * (patch + m.d_model * m.num_classes)

    def loss(self, model, batch, device, amp):
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with amp():
            logits = model(images)
        return classification_loss(logits, labels, self.model_cfg.label_smoothing)

    def validate(self, model, micro_batch, device, amp):
        if self.val_shards is None:
            return None
        sums = Sums()
        with evaluating(model):
            for images, labels in self.val_batches(micro_batch):
                images, labels = images.to(device), labels.to(device)
                with amp():
                    logits = model(images)
                n = len(labels)
                sums.add("val_loss", F.cross_entropy(logits.float(), labels, reduction="sum").item(), n)
                sums.add("val_top1", int(topk_correct(logits, labels, 1)), n)
                sums.add("val_top5", int(topk_correct(logits, labels, 5)), n)
        return sums.means()
