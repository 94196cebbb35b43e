"""Masked-autoencoder pretraining (He et al. 2021): reconstruct the pixels of the patches the encoder never saw."""

from __future__ import annotations

from typing import NamedTuple

import torch

from fmforge.models.vit import MAE, patchify


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
             generator: torch.Generator | None = None, norm_pix: bool = True) -> MAEOutput:
    """Mask, encode, decode, and score one batch of images [B, C, H, W]."""
    pred, mask = model(images, mask_ratio=mask_ratio, generator=generator)
    target = pixel_targets(images, model.cfg.encoder.patch_size, norm_pix)
    return MAEOutput(masked_patch_mse(pred, target, mask), pred, mask)
