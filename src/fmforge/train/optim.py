"""AdamW with the usual no-decay groups (and μP's per-layer learning rates), and the learning-rate schedules
(warmup + cosine / WSD / constant)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fmforge.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """Decay the weight matrices of Linear and Conv layers only. Norms, biases, embeddings (and a head tied
    to them), and free-standing tensors — ViT's [CLS] token and position table, MAE's mask token, CLIP's
    temperature and bias — are not decayed, following GPT-2/nanoGPT, timm and open_clip.

    A μP model (``model.cfg.mup`` set) is split further by ``model.param_kinds()``: see ``mup_groups``.
    ``lr`` is the base learning rate, needed only then (the groups carry their own)."""
    decayed: set[int] = set()
    embeddings: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.ndim >= 2:
            decayed.add(id(module.weight))
        elif isinstance(module, nn.Embedding):
            embeddings.add(id(module.weight))
    decayed -= embeddings  # a head tied to the embedding is the embedding
    if getattr(getattr(model, "cfg", None), "mup", None) is not None:
        if lr is None:
            raise ValueError("a μP model's parameter groups need the base learning rate")
        return mup_groups(model, decayed, weight_decay, lr)
    decay, keep = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if p.requires_grad:
            (decay if id(p) in decayed else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def mup_groups(model: nn.Module, decayed: set[int], weight_decay: float, lr: float) -> list[dict]:
    """μP's per-layer AdamW settings (Yang et al. 2022, Table 3, with the output multiplier form of their
    Table 8 / the ``mup`` package's MuReadout): with m = ``model.cfg.width_mult``, hidden weights
    (``param_kinds()["hidden"]``) train at lr / m with weight decay x m, so each step still decays them by
    lr x wd (weight decay independent of the width); embeddings, the output head (its logits are scaled by
    1 / m in the forward instead), norms, biases and parameters the model does not list keep lr and wd.
    Which parameters decay is ``param_groups``'s rule. Base-lr groups come first: group 0's lr is ``lr``,
    the one the trainer logs."""
    m = model.cfg.width_mult
    hidden = {id(p) for p in model.param_kinds()["hidden"]}
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            buckets.setdefault((id(p) in hidden, id(p) in decayed), []).append(p)
    groups = []
    for is_hidden, decays in ((False, True), (False, False), (True, True), (True, False)):
        if params := buckets.get((is_hidden, decays)):
            wd = (weight_decay * m if is_hidden else weight_decay) if decays else 0.0
            groups.append({"params": params, "lr": lr / m if is_hidden else lr, "weight_decay": wd})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    fused = cfg.fused
    if fused is None:  # fused kernels exist for CUDA and (torch >= 2.4) CPU
        fused = device.type in ("cuda", "cpu")
    foreach = None
    # Tensor parallelism leaves embeddings and norms as plain tensors (or DTensors on the data-parallel mesh
    # only) beside DTensor blocks; the fused and foreach kernels take one kind per call, so step one tensor
    # at a time there (a few ms per step; the step itself is far longer for models that need TP).
    meshes = {p.device_mesh if isinstance(p, DTensor) else None for p in model.parameters()}
    if len(meshes) > 1:
        fused, foreach = False, False
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused, foreach=foreach)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier on ``cfg.lr`` for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # WSD (warmup-stable-decay, Hu et al. 2024 "MiniCPM"): flat, then a linear decay over the last fraction.
    decay_steps = max(1, int(max_steps * cfg.decay_fraction))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return 1.0
    return floor + (1 - floor) * max(0.0, 1 - (step - decay_start) / decay_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
