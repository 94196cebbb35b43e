"""CLIP (Radford et al. 2021): a ViT image tower and a causal text transformer, both on the shared ``Block``,
projected into one embedding space where matching image-text pairs score highest.

The model returns unit-norm features and the (clamped) temperature; the contrastive losses, including
their multi-process form with negatives from the whole global batch, live in objectives/contrastive.py.
The same model trains with SigLIP's sigmoid loss when built with a logit bias (``SIGLIP_LOGIT_INIT``).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from fmforge.models.blocks import Block, init_normal_, make_norm
from fmforge.models.config import BlockConfig, Section, encoder_block_config
from fmforge.models.sizes import CLIP_SIZES, SIGLIP_LOGIT_INIT, apply_size, lookup_size
from fmforge.models.vit import (
    GELU_KERNEL,
    VisionConfig,
    ViT,
)


class TextConfig(Section):
    vocab_size: PositiveInt = 49408
    context_length: PositiveInt = 77
    d_model: PositiveInt = 512
    n_layer: PositiveInt = 12
    n_head: PositiveInt = 8
    d_ff: PositiveInt | None = None
    # Where a caption's embedding is read: "argmax" of the token ids (OpenAI's BPE puts end-of-text last in
    # the vocabulary), the first ``eot_token_id``, or the "last" token before right-padding with ``pad_token_id``.
    pool: Literal["argmax", "eot", "last"] = "argmax"
    eot_token_id: NonNegativeInt | None = None
    pad_token_id: NonNegativeInt | None = None
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    gelu: Literal["exact", "tanh", "quick"] = "exact"  # OpenAI CLIP checkpoints: quick, x * sigmoid(1.702 x)
    bias: bool = True
    norm_eps: PositiveFloat = 1e-5
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    init_std: PositiveFloat = 0.02

    @model_validator(mode="after")
    def _check(self) -> TextConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.pool == "eot" and self.eot_token_id is None:
            raise ValueError("pool=eot needs eot_token_id")
        if self.pool == "last" and self.pad_token_id is None:
            raise ValueError("pool=last needs pad_token_id")
        return self

    def block_config(self) -> BlockConfig:
        return encoder_block_config(self, self.d_model, self.n_head, self.d_ff)


class CLIPConfig(Section):
    vision: VisionConfig = VisionConfig(patch_size=32, num_classes=0, ln_pre=True, patch_bias=False, norm_eps=1e-5)
    text: TextConfig = TextConfig()
    embed_dim: PositiveInt = 512
    init_logit_scale: float = math.log(1 / 0.07)  # temperature 0.07
    init_logit_bias: float | None = None  # set (SigLIP: -10) to learn a bias for the sigmoid loss
    max_logit_scale: PositiveFloat = 100.0  # CLIP clips the temperature so logits never scale beyond 100

    @model_validator(mode="after")
    def _check(self) -> CLIPConfig:
        if self.vision.num_classes:
            raise ValueError("vision.num_classes must be 0: the image tower feeds a projection, not a classifier")
        return self

    @classmethod
    def from_size(cls, name: str, **overrides) -> CLIPConfig:
        """``overrides`` may hold ``vision={...}`` / ``text={...}`` with tower fields to change."""
        spec = lookup_size(CLIP_SIZES, name, "CLIP")
        vision = VisionConfig(**{**spec.pop("vision"), **overrides.pop("vision", {})})
        text = TextConfig(**{**spec.pop("text"), **overrides.pop("text", {})})
        return cls(vision=vision, text=text, **{**spec, **overrides})


class CLIPModelConfig(CLIPConfig):
    """The ``model:`` section of an image-text contrastive run, named by ``size`` (a key of ``CLIP_SIZES``;
    explicit fields win, ``vision``/``text`` merge field by field). ``loss: siglip`` trains with the sigmoid
    loss and starts temperature and bias at SigLIP's values unless given. The text tower's vocabulary and
    end-of-text pooling come from the data's caption tokenizer unless set."""

    arch: Literal["clip"] = "clip"
    size: str | None = None
    loss: Literal["clip", "siglip"] = "clip"

    @model_validator(mode="before")
    @classmethod
    def _size_defaults(cls, data):
        data = apply_size(data, CLIP_SIZES, "CLIP", skip=("text.vocab_size",))
        if isinstance(data, dict) and data.get("loss") == "siglip":
            data = {**SIGLIP_LOGIT_INIT, **data}
        return data

    @model_validator(mode="after")
    def _check_loss(self) -> CLIPModelConfig:
        if (self.loss == "siglip") != (self.init_logit_bias is not None):
            raise ValueError("init_logit_bias goes with loss=siglip (the sigmoid loss learns a bias), and only with it")
        return self


class CLIPOutput(NamedTuple):
    image_features: torch.Tensor  # [B, embed_dim], unit norm
    text_features: torch.Tensor  # [B, embed_dim], unit norm
    logit_scale: torch.Tensor  # [1]: exp(learned log-scale), clamped at max_logit_scale
    logit_bias: torch.Tensor | None  # [1] for the sigmoid loss, else None


class TextTransformer(nn.Module):
    """GPT-style causal encoder over caption tokens; the caption's embedding is its end-of-text token's
    output, the one position that has seen every other token."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        bcfg = cfg.block_config()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        gelu = GELU_KERNEL[cfg.gelu]
        self.blocks = nn.ModuleList(Block(bcfg, causal=True, gelu_approximate=gelu) for _ in range(cfg.n_layer))
        self.norm = make_norm(bcfg)

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.cfg.init_std
        init_normal_(self.tok_emb.weight, std, truncated=False)
        init_normal_(self.pos_emb.weight, std / 2, truncated=False)  # OpenAI: 0.01 for positions
        for block in self.blocks:
            block.init_weights(std, std / math.sqrt(2 * self.cfg.n_layer), truncated=False)
        self.norm.reset_parameters()

    def pool_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.pool == "argmax":
            return tokens.argmax(dim=-1)
        if cfg.pool == "eot":
            return (tokens == cfg.eot_token_id).int().argmax(dim=-1)  # the first end-of-text
        return (tokens != cfg.pad_token_id).sum(dim=-1).clamp(min=1) - 1

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled caption features [B, d_model] for tokens [B, T], T <= context_length."""
        T = tokens.size(1)
        if T > self.cfg.context_length:
            raise ValueError(f"captions of {T} tokens exceed context_length {self.cfg.context_length}")
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(torch.arange(T, device=tokens.device)))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[torch.arange(x.size(0), device=x.device), self.pool_positions(tokens)]


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = ViT(cfg.vision)
        self.text = TextTransformer(cfg.text)
        self.image_proj = nn.Linear(cfg.vision.d_model, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.d_model, cfg.embed_dim, bias=False)
        # Shape [1], not a 0-d scalar: FSDP2 shards parameters along a dimension and refuses scalars.
        self.logit_scale = nn.Parameter(torch.empty(1))
        self.logit_bias = nn.Parameter(torch.empty(1)) if cfg.init_logit_bias is not None else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Towers as their families do; projections N(0, width^-1/2) as OpenAI's, so projected features start
        at unit scale; the temperature and bias at their configured starting values."""
        self.visual.init_weights()
        self.text.init_weights()
        init_normal_(self.image_proj.weight, self.cfg.vision.d_model ** -0.5, truncated=False)
        init_normal_(self.text_proj.weight, self.cfg.text.d_model ** -0.5, truncated=False)
        self.logit_scale.fill_(self.cfg.init_logit_scale)
        if self.logit_bias is not None:
            self.logit_bias.fill_(self.cfg.init_logit_bias)

    def reset_buffers(self) -> None:
        self.visual.reset_buffers()

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.image_proj(self.visual.features(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text_proj(self.text(tokens))
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> CLIPOutput:
        # Clamped here rather than after each optimizer step: past the cap the gradient is zero, so the
        # learned log-scale stops where it crossed, and every caller sees the same effective temperature.
        scale = self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)
        return CLIPOutput(self.encode_image(images), self.encode_text(tokens), scale, self.logit_bias)

    def block_stacks(self) -> list[nn.ModuleList]:
        """The repeated blocks that parallelism wraps one by one (``registry.block_stacks``)."""
        return [self.visual.blocks, self.text.blocks]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
