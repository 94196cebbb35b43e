"""Masked-autoencoder pretraining (He et al. 2021): reconstruct the pixels of the patches the encoder never
saw. Labels and captions in the data, if any, are ignored."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from fmforge.models.vit import MAE, patchify
from fmforge.objectives.base import Sums, block_params, encoder_flops, evaluating
from fmforge.objectives.images import ImageTask


class MAEOutput(NamedTuple):
    loss: torch.Tensor  # scalar, fp32
    pred: torch.Tensor  # [B, N, patch_dim] predicted pixels (normalized per patch when norm_pix)
    mask: torch.Tensor  # [B, N], 1 = masked


def pixel_targets(images: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """What the decoder should predict per patch [B, N, patch_dim]. With ``norm_pix`` each patch is
    normalized by its own mean and variance (the paper's better-performing target: it rewards
    reconstructing local contrast, not the patch's average colour)."""
    target = patchify(images, patch_size).float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as in the reference implementation
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch, averaged over the masked patches only: visible patches were the
    encoder's input, so reconstructing them would teach copying, not understanding."""
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def mae_loss(model: MAE, images: torch.Tensor, *, mask_ratio: float | None = None,
             generator: torch.Generator | None = None, norm_pix: bool = True,
             patch_size: int | None = None) -> MAEOutput:
    """Mask, encode, decode, and score one batch of images [B, C, H, W]. ``patch_size`` defaults to the
    model's (give it when ``model`` is wrapped by DDP/FSDP)."""
    pred, mask = model(images, mask_ratio=mask_ratio, generator=generator)
    target = pixel_targets(images, patch_size or model.cfg.encoder.patch_size, norm_pix)
    return MAEOutput(masked_patch_mse(pred, target, mask), pred, mask)


class MAETask(ImageTask):
    @property
    def vision(self):
        return self.model_cfg.encoder

    def build_model(self) -> nn.Module:
        return MAE(self.model_cfg)

    def flops_per_unit(self, model: nn.Module) -> float:
        m, enc = self.model_cfg, self.model_cfg.encoder
        keep = max(1, int(enc.num_patches * (1 - m.mask_ratio) + 1e-9))
        t_enc, t_dec = enc.n_prefix + keep, enc.n_prefix + enc.num_patches
        flops = encoder_flops(model.encoder.blocks, t_enc, enc.n_layer, enc.d_model)
        flops += 6.0 * block_params([model.decoder_blocks]) * t_dec
        flops += 12.0 * m.decoder_n_layer * m.decoder_d_model * t_dec * t_dec
        flops += 6.0 * (enc.patch_dim * enc.d_model * enc.num_patches + enc.d_model * m.decoder_d_model * t_enc
                        + m.decoder_d_model * enc.patch_dim * t_dec)
        return flops

    def _loss(self, model, images, generator=None) -> torch.Tensor:
        return mae_loss(model, images, generator=generator, norm_pix=self.model_cfg.norm_pix,
                        patch_size=self.vision.patch_size).loss

    def loss(self, model, batch, device, amp):
        images = batch[0].to(device, non_blocking=True)
        with amp():  # masks come from torch's RNG: checkpointed, so a resumed run draws the same
            return self._loss(model, images)

    def validate(self, model, micro_batch, device, amp):
        if self.val_shards is None:
            return None
        sums = Sums()
        with evaluating(model):
            g = torch.Generator(device).manual_seed(0)  # the same masks at every validation: comparable losses
            for images, _ in self.val_batches(micro_batch):
                images = images.to(device)
                with amp():
                    sums.add("val_loss", self._loss(model, images, g).item() * len(images), len(images))
        return sums.means()
