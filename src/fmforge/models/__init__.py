"""Model families built from one shared transformer block (``blocks.py``); ``build_model`` picks by config."""

from __future__ import annotations

import torch.nn as nn

from fmforge.models.config import ModelConfig


def build_model(cfg) -> nn.Module:
    """The model a ``model:`` config describes: a decoder for a ``ModelConfig`` (resolved first, a no-op
    when it already is, so one without vocab_size/max_seq_len fails here naming the missing field), else
    ViT, MAE, CLIP or BERT by the config's ``arch``."""
    if isinstance(cfg, ModelConfig):
        from fmforge.models.gpt import GPT

        return GPT(cfg.resolved())
    if cfg.arch == "vit":
        from fmforge.models.vit import ViT

        return ViT(cfg)
    if cfg.arch == "mae":
        from fmforge.models.vit import MAE

        return MAE(cfg)
    if cfg.arch == "clip":
        from fmforge.models.clip import CLIP

        return CLIP(cfg)
    if cfg.arch == "bert":
        from fmforge.models.bert import Bert

        return Bert(cfg)
    raise ValueError(f"no model family for arch {cfg.arch!r}")
