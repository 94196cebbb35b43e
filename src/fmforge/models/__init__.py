"""Model families built from one shared transformer block (``blocks.py``); ``build_model`` picks by config."""

from __future__ import annotations

import torch.nn as nn

from fmforge.config import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model a ``ModelConfig`` describes. ``cfg`` is resolved first (a no-op when it already is), so a
    config without vocab_size/max_seq_len fails here with one line naming the missing field."""
    from fmforge.models.gpt import GPT

    return GPT(cfg.resolved())
